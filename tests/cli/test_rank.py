"""The rank of this process, read as Lightning reads it."""


def test_the_rank_is_read_as_lightning_reads_it(monkeypatch):
    from lightning.fabric.utilities.rank_zero import _get_rank

    from mlm_lightning.cli.rank import process_rank

    for env in ({}, {"LOCAL_RANK": "1"}, {"RANK": "3", "LOCAL_RANK": "1"}, {"SLURM_PROCID": "2", "LOCAL_RANK": "0"}):
        for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert process_rank() == (_get_rank() or 0), env
