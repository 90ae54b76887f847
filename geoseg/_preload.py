"""Imported by geoseg's fork server (geoseg.forkserver): the modules a model task needs, each on its own.

multiprocessing's fork server skips a preload that raises ImportError but dies on anything else (an
OSError from a broken CUDA or torch library), and the cluster could then start no worker. Importing
through this module, a failure of any kind only leaves that module to the worker's first task.
"""

import importlib
import signal

# Ctrl-C in the first seconds reaches the fork server too (one process group): the command closes
# everything, so no KeyboardInterrupt traceback from an import here
signal.signal(signal.SIGINT, signal.SIG_IGN)

MODULES = ("distributed", "torch", "segmentation_models_pytorch", "geoseg.workers", "geoseg.infer",
           "geoseg.model.store")

failed: dict[str, str] = {}
for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the import to the worker
        failed[_name] = f"{type(exc).__name__}: {exc}"

# what is loaded now is frozen (gc.freeze, before the first fork, as Python's docs advise): the workers forked from
# here skip its 400 k objects in every full collection and do not copy their pages for it, and the server's own
# exit, after the command, no longer searches them for cycles (about 1 s of a core)
import gc  # noqa: E402

gc.freeze()
