import pytest

from sccsdxl import rounds
from sccsdxl.errors import ParameterError


def test_v41_is_the_scc24_round_with_its_seeds():
    r = rounds.get_round("v4.1")
    assert r.seeds == {"qsl_rng_seed": 3066443479025735752, "sample_index_rng_seed": 10688027786191513374,
                       "schedule_rng_seed": 14962580496156340209}
    assert r.layout == "v4" and not r.accuracy_quoted


def test_current_round_is_read_from_the_installed_loadgen():
    current = rounds.get_round("current")
    assert current.name in rounds.ROUNDS
    assert rounds.round_of_seeds(current.seeds) is current


def test_every_round_has_distinct_seeds():
    assert len({tuple(r.seeds.values()) for r in rounds.ROUNDS.values()}) == len(rounds.ROUNDS)


def test_unknown_round_lists_the_known_ones():
    with pytest.raises(ParameterError, match="unknown MLPerf round 'v9'") as err:
        rounds.get_round("v9")
    assert "v4.1" in err.value.fix and "current" in err.value.fix
