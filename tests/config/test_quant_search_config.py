"""quantize.static's `search:` from the shell: the preset leaves it off, pipeline=ptq_search
turns it on, and an empty candidate set is refused before anything runs, naming key and fix."""

import pytest

from bonsai.config import validate_config
from bonsai.errors import ConfigError
from flows.compress import compose_config


def test_search_is_off_in_the_preset_and_on_in_ptq_search():
    assert compose_config([])["pipeline"]["stages"]["int8"]["search"] is None
    stages = compose_config(["pipeline=ptq_search"])["pipeline"]["stages"]
    assert stages["int8"]["search"] is None
    assert stages["int8_search"]["search"]["objective"] == "latency"
    validate_config(compose_config(["pipeline=ptq_search"]))


def test_an_empty_candidate_set_is_refused_before_compute():
    cfg = compose_config(["pipeline=ptq_search", "pipeline.stages.int8_search.search.op_types=[]"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "pipeline.stages.int8_search.search.op_types" in msg
    assert "leaves no candidate to try" in msg and "list at least one value" in msg
