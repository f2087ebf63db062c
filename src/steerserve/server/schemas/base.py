"""The base of every request schema: unknown fields are refused, so a misspelt extension
option is an error, not a silently ignored setting."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
