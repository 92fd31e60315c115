"""Chat templates for serving: re-exported from `palm_rlhf.data.chat`, their one home (training
data renders chats with the same templates as the server)."""

from ..data.chat import ROLES, TEMPLATE_FILE, ChatTemplate, JinjaChatTemplate, prompt_ids, template_for

__all__ = ["ChatTemplate", "JinjaChatTemplate", "template_for", "prompt_ids", "TEMPLATE_FILE", "ROLES"]
