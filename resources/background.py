"""Imports a step starts in a thread, so that they overlap its wait for the warehouse lock (or a
query): a step runs in a fresh process, where importing GX takes about 1.6 s and torch with
sentence-transformers about 4.7 s. Python's import lock makes the step's own import of the same
module wait for the thread to finish it."""

import importlib
import threading


def import_in_background(*modules: str) -> threading.Thread:
    def run() -> None:
        for module in modules:
            importlib.import_module(module)

    thread = threading.Thread(target=run, name=f"import {', '.join(modules)}", daemon=True)
    thread.start()
    return thread
