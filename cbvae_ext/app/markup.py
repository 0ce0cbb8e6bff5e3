"""Text a user or a link supplied, shown on the page as itself: the one escape every echoed value goes through.

Streamlit renders most text elements (``st.caption``, ``st.warning``, ``st.markdown``, ...) as GitHub-flavoured
markdown. A shared link's ``?task=`[Log in](https://ev.il/x)`` used to close the code span it was quoted in
and render a link (an image link loads a remote tracker). Escaping cannot work inside a code span (a
backslash there is literal), so echoed values are never put in one: they are escaped as plain text instead.

Escapes alone do not stop GitHub-flavoured autolinks: Streamlit's renderer (remark-gfm) links ``https://``,
``www.`` and ``a@b.c`` in the text *after* escapes are resolved (a real browser showed it). So a word joiner
(U+2060, invisible, not a space) goes between ``:`` and ``//``, after ``www`` and after ``@``, where those
patterns would otherwise form.
"""

from __future__ import annotations

import re

__all__ = ["WORD_JOINER", "md_escape"]

# CommonMark's punctuation that can start markup, plus GFM autolink literals (``https://``, ``www.``, ``a@b.c``)
# and Streamlit's ``:colour[...]`` / ``:emoji:`` directives, all broken by escaping ``:``, ``/``, ``@`` and ``.``
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$&:/@])")
#: Invisible, and not a word character to remark-gfm's autolink patterns.
WORD_JOINER = "\u2060"
_AUTOLINK = re.compile(r"(?<=:)(?=/)|(?<=@)|(?<=www)(?=\.)", flags=re.IGNORECASE)
_SPACE = re.compile(r"[\r\n\t\f\v\u2028\u2029]+")


def md_escape(text: object) -> str:
    """``text`` (any value, as ``str``) escaped for Streamlit markdown: it can neither format the page nor add a
    link, an image or HTML; line breaks become spaces, so it cannot start a heading or a list either."""
    text = _AUTOLINK.sub(WORD_JOINER, _SPACE.sub(" ", str(text)))
    return _MARKDOWN.sub(r"\\\1", text)
