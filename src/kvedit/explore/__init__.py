"""The memory explorer (`kvedit explore`): a local web page over one model's FFN key-value memories.

    from kvedit.explore import ExploreSession, create_app
    session = ExploreSession(kvedit.load_model())
    app = create_app(session)          # a FastAPI app; serve it with uvicorn

Prompt view (next token, top memories per layer, logit lens), memory view (value tokens, trigger examples,
coefficients on the prompt), interventions, and edits with their patch view, list, revert and patch files.
"""

from .api import create_app
from .forms import EditForm, ExploreSettings
from .session import ExploreSession

__all__ = ["EditForm", "ExploreSession", "ExploreSettings", "create_app"]
