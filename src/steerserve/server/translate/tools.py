"""A chat body's tools and tool_choice, checked, and the grammar that `required` and a named
function impose (so the arguments always follow the tool's schema). `auto` is not
constrained: the model chooses, and its calls are read out of the text."""

from __future__ import annotations

from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.schemas.tools import NamedToolChoice
from steerserve.server.tools.formats import ToolFormat
from steerserve.server.tools.prompt import offered_tools
from steerserve.server.translate.structured import Constraint, check_schema_patterns


def check_tools(req: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in req.tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", "tools")
    choice = req.tool_choice
    if (choice == "required" or isinstance(choice, NamedToolChoice)) and not names:
        raise APIError(400, "tool_choice needs tools to choose from", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice names '{choice.function.name}', which is not among "
                       "the tools", "tool_choice")


def tool_constraint(req: ChatCompletionRequest, fmt: ToolFormat) -> Constraint | None:
    """The grammar of `required` (any listed tool) or of one named function."""
    choice = req.tool_choice
    tools = offered_tools(req)
    if choice == "required" or isinstance(choice, NamedToolChoice):
        for tool in tools:
            check_schema_patterns(tool["function"].get("parameters"), "tools")
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        return Constraint(fmt.grammar(named, parallel=False), "tools")
    if choice == "required":
        return Constraint(fmt.grammar(tools, req.parallel_tool_calls), "tools")
    return None


def reads_calls(req: ChatCompletionRequest) -> bool:
    """Whether the answer's text is read for calls."""
    return bool(offered_tools(req))
