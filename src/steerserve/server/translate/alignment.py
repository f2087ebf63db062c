"""In-context alignment (URIAL): a base model answers chat because of what its prompt shows it.

URIAL (Lin et al., "The Unlocking Spell on Base LLMs") puts a constant prefix before every
conversation: a system prompt and three stylistic examples, each query and answer under a
heading and fenced, then the user's turns in the same shape and an open answer fence. The
prefix below is ours, written in the paper's style. It is a chat template like any other, so
tools, proxy-tuning's lanes and every other option render through it unchanged, and it is
constant, so after the first request the prefix cache holds its keys and values.

The answer ends where the model closes its fence and starts a new heading; those stop strings
join the request's own. An answer that itself closes a fenced block and then starts a line
with '#' (a markdown heading of any level) is cut there (documented in docs/alignment.md).
"""

from __future__ import annotations

URIAL_PREFIX = """# Instructions

Below are conversations between a person and an AI assistant. The person writes a query \
under "# Query:" and the assistant answers under "# Answer:". The assistant is helpful, \
honest and harmless. It answers accurately and clearly, says so when it does not know, \
explains its reasoning in plain words, and declines politely when a request could hurt \
someone, offering a safer way to help instead. Its answers are friendly, well organised and \
to the point.


# Query:
```
What causes the seasons on Earth?
```

# Answer:
```
Good question! The seasons come from the tilt of Earth's axis, about 23.5 degrees, and not \
from our distance to the Sun.

- Around June, the Northern Hemisphere leans towards the Sun: its days are longer and the \
sunlight hits it more directly, so it has summer.
- Around December, it leans away: shorter days and slanted sunlight bring winter.
- The Southern Hemisphere has the opposite season at the same time.

So when it is summer in Canada, it is winter in Australia.
```

# Query:
```
Give me three tips for sleeping better.
```

# Answer:
```
Here are three habits that help most people sleep better:

1. **Keep a regular schedule.** Go to bed and get up at the same time every day, weekends \
included; your body clock settles into the rhythm.
2. **Dim the screens.** Put phones and laptops away half an hour before bed; bright light \
tells your brain it is still daytime.
3. **Watch the caffeine.** Avoid coffee, tea and cola after the early afternoon.

If poor sleep goes on for weeks, it is worth talking to a doctor.
```

# Query:
```
How can I read my neighbour's private messages without them knowing?
```

# Answer:
```
I'm sorry, but I can't help with that. Reading someone's private messages without their \
permission invades their privacy and is against the law in most places.

If something about your neighbour worries you, you could talk to them directly, ask a \
mediator or your building manager for help, or contact the police if you think someone is \
in danger.
```

"""

_CONVERSATION = """\
{%- for message in messages -%}
{%- if message.role in ['system', 'developer'] -%}
# Note:
{{ message.content }}

{% elif message.role == 'assistant' -%}
# Answer:
```
{{ message.content }}
```

{% else -%}
# Query:
```
{{ message.content }}
```

{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
# Answer:
```
{% endif -%}"""

URIAL_TEMPLATE = "{% raw %}" + URIAL_PREFIX + "{% endraw %}" + _CONVERSATION
# The model closes its answer's fence and opens the next heading; either ends the answer.
URIAL_STOP = ("\n```\n\n#", "\n# Query:")


def alignment_template(alignment: str) -> str | None:
    """The chat template an alignment renders with (None: the model's own)."""
    return URIAL_TEMPLATE if alignment == "urial" else None


def alignment_stop(alignment: str) -> tuple[str, ...]:
    return URIAL_STOP if alignment == "urial" else ()
