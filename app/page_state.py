"""What keeps a page on the run its user chose: the run named in the address (``?run=NAME``) or, failing that,
the one this browser showed last (local storage), ahead of the service's default; the run box's notice (its
folder, and which run trains now when it is another one); the Train tab's line showing the trigger word.
"""
from __future__ import annotations

import html

from app.common import notice
from app.service import Service

STORAGE_KEY = "lora-trainer-run"
# On page load: the run this page should show, read in the browser (handed to ``pick_run`` as the run box value).
PICK_JS = (f"() => new URLSearchParams(window.location.search).get('run') || "
           f"window.localStorage.getItem('{STORAGE_KEY}') || ''")
# When the run box changes: remember it in this browser and in the address, so a reload comes back to it.
REMEMBER_JS = ("(run) => { const name = (run || '').trim(); if (!name) return; "
               f"try {{ window.localStorage.setItem('{STORAGE_KEY}', name); }} catch (e) {{}} "
               "const url = new URL(window.location.href); url.searchParams.set('run', name); "
               "window.history.replaceState(window.history.state, '', url); }")


# Page-wide: a link with data-goto-tab="<tab name>" opens that tab (messages point to where the fix is).
GOTO_TAB_JS = ("() => { document.addEventListener('click', (e) => { const a = e.target.closest('[data-goto-tab]'); "
               "if (!a) return; e.preventDefault(); const want = a.getAttribute('data-goto-tab'); "
               "const tab = [...document.querySelectorAll('button[role=tab]')].find(b => b.innerText.trim() === want); "
               "if (tab) { tab.click(); window.scrollTo(0, 0); } }); }")


def goto_tab(tab: str, text: str) -> str:
    """A link that opens ``tab`` (its label, e.g. "1. Dataset"), for notices (see ``GOTO_TAB_JS``)."""
    return (f'<a href="#" class="goto-tab" data-goto-tab="{html.escape(tab)}">{html.escape(text)}</a>')


def refusal_html(err: Exception) -> str:
    """Start refused: the message, and for a dataset problem a link to the Dataset tab."""
    link = ""
    if getattr(err, "field", None) == "data_dir":
        link = f'<div class="notice-link">{goto_tab("1. Dataset", "→ Open the 1. Dataset tab to fix it")}</div>'
    return notice(str(err), "error") + link


def pick_run(service: Service, wanted: str | None) -> str:
    """``wanted`` when it names a run folder, else the service's default (the training run, or the newest
    folder): a run deleted since this browser showed it does not come back as an empty run."""
    name = (wanted or "").strip()
    if name:
        try:
            if service.run_dir(name).is_dir():
                return name
        except Exception:  # noqa: BLE001 - an unusable name from the address or storage: use the default
            pass
    return service.default_run()


def run_notice(service: Service, name: str) -> str:
    """The run box's notice: which run trains now when the page shows another one, then the run's folder."""
    where = service.run_dir(name)
    cur = service.jobs.overview().current
    head = ""
    if cur.active and cur.run and cur.run != name.strip():
        head = notice(f"Run '{cur.run}' is training now (step {cur.step} / {cur.total_steps or '?'}); this page "
                      f"shows run '{name.strip()}'. Pick '{cur.run}' in the Run box to follow it.", "warn")
    return head + notice(f"Run folder: {where}", "info")


def trigger_html(word: str | None) -> str:
    """The Train tab's reminder of the trigger word typed on the Dataset tab."""
    word = (word or "").strip()
    if not word:
        return notice("No trigger word: captions train as written. To call up the subject with a word, type "
                      "one on the 1. Dataset tab.", "warn")
    return (f'<div class="notice notice-info" data-trigger="{html.escape(word)}">Trigger word: '
            f"<b>{html.escape(word)}</b> (from the 1. Dataset tab; put first in every caption when training)"
            "</div>")
