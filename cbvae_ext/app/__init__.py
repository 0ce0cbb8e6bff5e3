"""The Counterfactual Machine's logic, apart from its Streamlit page (``app/streamlit_app.py``).

- ``session``: the run folder, starting points, sliders and extrapolation flags;
- ``render``: orthogonal slices and glass brain on the 2 mm MNI152 template;
- ``terms``: typed text to NeuroQuery's terms (its tokeniser, vocabulary and synonyms);
- ``words``: typed terms to a topic mixture (ask in words);
- ``evidence``: the real studies nearest to the conditions and their mean map;
- ``regions``: atlas names for what changed;
- ``state``: the view in the URL query string;
- ``downloads``: generated NIfTI files and sweep sidecars;
- ``markup``: the one escape of every echoed value;
- ``serving``: loopback only, unless the operator opts in;
- ``keys``: the page's widget keys.
"""

from __future__ import annotations

__all__ = [
    "downloads", "evidence", "keys", "markup", "regions", "render", "serving", "session", "state", "terms", "words",
]  # fmt: skip
