"""The scripts' logging follows ``--log_level`` as transformers' ``run_glue.py`` does, and reaches this package's own
loggers, which are not under transformers' and would otherwise stay at the root logger's warning level."""

import logging

import pytest
import transformers

from rmt_kd_hf import RMTKDConfig
from rmt_kd_hf.scripts import setup_logging


@pytest.fixture
def restored_levels():
    package_logger, script_logger = logging.getLogger("rmt_kd_hf"), logging.getLogger("a_script")
    levels = (transformers.logging.get_verbosity(), package_logger.level, script_logger.level)
    yield script_logger
    transformers.logging.set_verbosity(levels[0])
    package_logger.setLevel(levels[1])
    script_logger.setLevel(levels[2])


@pytest.mark.parametrize(("log_level", "expected"), [("passive", logging.INFO), ("error", logging.ERROR)])
def test_the_log_level_reaches_the_package_the_script_and_transformers(
    log_level, expected, tmp_path, restored_levels, caplog
):
    args = RMTKDConfig(output_dir=str(tmp_path), log_level=log_level, use_cpu=True, report_to="none")
    setup_logging(args, restored_levels)
    assert restored_levels.level == expected
    assert logging.getLogger("rmt_kd_hf").getEffectiveLevel() == expected
    assert transformers.logging.get_verbosity() == expected
    with caplog.at_level(logging.NOTSET, logger="rmt_kd_hf.stages"):  # the handler takes all; the logger decides
        logging.getLogger("rmt_kd_hf.stages").info("RMT-KD stage 0: kept")
    assert ("RMT-KD stage 0: kept" in caplog.text) == (expected <= logging.INFO)
