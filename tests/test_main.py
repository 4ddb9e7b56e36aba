"""The entry point's console: third-party warnings are quiet by default, errors and the package's warnings are not."""

import logging
import warnings

import pytest
from absl import logging as absl_logging

from llava_cot_jax import main


@pytest.fixture
def restore_log_levels():
    names = (*main.THIRD_PARTY_LOGGERS, "orbax.checkpoint", "llava_cot_jax", "")
    levels = {name: logging.getLogger(name).level for name in names}
    verbosity = absl_logging.get_verbosity()
    with warnings.catch_warnings():
        yield
    absl_logging.set_verbosity(verbosity)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_third_party_warnings_are_quiet_and_errors_pass(restore_log_levels, caplog):
    caplog.set_level(logging.NOTSET)
    main.quiet_third_party_logs()
    absl_logging.warning("Skipping merge of OCDBT checkpoints")  # how Orbax logs it
    logging.getLogger("orbax.checkpoint").warning("orbax warning")
    logging.getLogger("grain").info("grain info")
    logging.getLogger("jax._src.xla_bridge").warning("jax warning")
    logging.getLogger("orbax.checkpoint").error("orbax error")
    absl_logging.error("absl error")
    logging.getLogger("llava_cot_jax.train").warning("our warning")
    assert [r.getMessage() for r in caplog.records] == ["orbax error", "absl error", "our warning"]

    warnings.simplefilter("always")
    main.quiet_third_party_logs()  # its filters go in front of "always"
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("from orbax", UserWarning, "x.py", 1, module="orbax.checkpoint.utils")
        warnings.warn_explicit("from jax", DeprecationWarning, "x.py", 1, module="jax")
        warnings.warn_explicit("from jaxtyping", UserWarning, "x.py", 1, module="jaxtyping")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="llava_cot_jax.demo")
    assert [str(w.message) for w in caught] == ["from jaxtyping", "ours"]
