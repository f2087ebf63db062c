"""The base of every request schema: unknown fields are refused, so a misspelt extension
option is an error, not a silently ignored setting."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from steerserve.adapters.names import NAME_PATTERN

# A name that may become a file name (adapters/names.py); checked again where the path is made.
ResourceName = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
