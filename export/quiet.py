"""Silence the torch/HF stack's own chatter (progress bars, exporter prints, warnings) for a block.

The build prints one line per step; the exporter's dozens of lines and the loaders' progress bars
bury it. Every setting is restored on exit: no process-wide change outlives the block.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet_torch_stack():
    """The exporter and the HF loaders print progress lines, bars and warnings that bury the
    build's own log; silence them for the block and restore every setting afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    verbosity = (tlog.get_verbosity(), dlog.get_verbosity())
    try:
        # their load reports would print tables before our one-line error
        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity[0])
        dlog.set_verbosity(verbosity[1])
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars[0]:
            tlog.enable_progress_bar()
        if bars[1]:
            dlog.enable_progress_bar()
