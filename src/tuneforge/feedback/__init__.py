"""Close the loop: store served responses and feedback, watch them, export them for retraining.

`FeedbackStore` (store.py) is also serve's RecordSink; `feedback_router` (routes.py) adds
`POST /v1/feedback` and `GET /dashboard` to the server. Retraining itself is recipes/retrain.py.
"""

from tuneforge.feedback.store import FeedbackStore

__all__ = ["FeedbackStore", "feedback_router"]


def __getattr__(name: str):
    if name == "feedback_router":  # FastAPI is only imported by those who serve
        from tuneforge.feedback.routes import feedback_router

        return feedback_router
    raise AttributeError(name)
