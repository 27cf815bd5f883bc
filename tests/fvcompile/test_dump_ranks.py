"""Rank-aware dumps: with several ranks each writes its own folder, and `inspect --from` reads
one rank or all of them."""
import datetime
import json

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import fvcompile
from fvcompile import dump
from fvcompile.cli import main
from fvcompile.dump import Dumper
from fvcompile.report import OptimizeReport

WORLD_SIZE = 2


class AllReduceMlp(torch.nn.Module):
    """A linear whose output every rank sums: a functional collective inside the compiled graph."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return funcol.all_reduce(torch.relu(self.lin(x)), "sum", dist.group.WORLD)


class RecordContext(fvcompile.GraphPass):
    """Writes what the post-grad pass context says of the graph's collectives to a file."""

    name = "record_context"

    def __init__(self, path: str):
        self.path = path

    def run(self, gm, ctx):
        with open(self.path, "a") as f:
            f.write(json.dumps([ctx.graph_kind, ctx.rank, ctx.world_size, list(ctx.process_groups)]) + "\n")
        return fvcompile.PassResult()


def _rank_worker(rank: int, store_path: str, dump_dir: str) -> None:
    # A short timeout: a rank that fails before the collective must not leave the other waiting.
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD_SIZE), rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same weights on every rank
        model = AllReduceMlp()
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        optimized = fvcompile.optimize(model, codegen=False, dump_dir=dump_dir,
                                       passes=[RecordContext(f"{store_path}_context_{rank}.jsonl")])
        out = optimized(x)
        out.sum().backward()
        torch.testing.assert_close(out, model(x))
    finally:
        dist.destroy_process_group()


def _index_files(folder) -> list[str]:
    return [f for fs in json.loads((folder / "index.json").read_text())["graphs"].values() for f in fs]


@pytest.mark.distributed
def test_two_gloo_ranks_dump_into_their_own_folders(tmp_path, capsys):
    import torch.multiprocessing as mp

    dump_dir = tmp_path / "dump"
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(dump_dir)), nprocs=WORLD_SIZE)

    # Nothing at the top but one folder per rank, each a complete dump of its own.
    assert sorted(p.name for p in dump_dir.iterdir()) == ["rank_0", "rank_1"]
    written = {}
    for rank in range(WORLD_SIZE):
        folder = dump_dir / f"rank_{rank}"
        index = json.loads((folder / "index.json").read_text())
        assert (index["rank"], index["world_size"]) == (rank, WORLD_SIZE)
        files = _index_files(folder)
        assert all((folder / f).is_file() for f in files)
        assert any(f.endswith("joint_at_joint_hook.py") for f in files), files
        assert "_c10d_functional.all_reduce" in (folder / files[0]).read_text()  # the dynamo graph
        assert json.loads((folder / index["report"]).read_text())["graphs"]
        written[rank] = {(folder / f).resolve() for f in files}
    assert not written[0] & written[1]

    # What a pass knows: its rank, the world size, and the group its graph's collective uses.
    for rank in range(WORLD_SIZE):
        lines = (tmp_path / f"store_context_{rank}.jsonl").read_text().splitlines()
        seen = [json.loads(line) for line in lines]
        assert [s[:3] for s in seen] == [["forward", rank, WORLD_SIZE], ["backward", rank, WORLD_SIZE]]
        assert len(seen[0][3]) == 1 and seen[1][3] == seen[0][3]  # the world group, forward and backward

    assert main(["inspect", "--from", str(dump_dir), "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "rank 1 of 2" in out and "rank_1" in out and "rank_0" not in out
    assert "1 graph(s) compiled" in out

    assert main(["inspect", "--from", str(dump_dir), "--rank", "all"]) == 0
    out = capsys.readouterr().out
    assert "rank 0 of 2" in out and "rank 1 of 2" in out


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_single_process_layout_has_no_rank_folder(tmp_path, capsys):
    optimized = fvcompile.optimize(Mlp(), codegen=False, dump_dir=tmp_path)
    optimized(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert not list(tmp_path.glob("rank_*"))
    index = json.loads((tmp_path / "index.json").read_text())
    assert "rank" not in index and (tmp_path / index["report"]).is_file()
    assert all((tmp_path / f).is_file() for f in _index_files(tmp_path))

    assert main(["inspect", "--from", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "single process" in out and "joint_at_joint_hook.py" in out


def _fake_rank_dump(root, monkeypatch, rank: int, world_size: int) -> None:
    """What `rank` of `world_size` dumps, written in this process (no process group needed)."""
    monkeypatch.setattr(dump, "process_rank", lambda: (rank, world_size))
    dumper = Dumper(root, "0/0", OptimizeReport())
    dumper.write_dynamo_graph(torch.fx.symbolic_trace(Mlp()))
    dumper.write_report()


def test_inspect_names_the_ranks_found_when_one_is_missing(tmp_path, monkeypatch, capsys):
    for rank in (0, 1):
        _fake_rank_dump(tmp_path, monkeypatch, rank, 2)
    assert main(["inspect", "--from", str(tmp_path), "--rank", "3"]) == 1
    err = capsys.readouterr().err
    assert "no dump of rank 3" in err and "ranks found: 0, 1" in err and err.count("\n") == 1


def test_inspect_from_refuses_what_is_no_dump(tmp_path, capsys):
    assert main(["inspect", "--from", str(tmp_path / "missing")]) == 1
    assert "no dump directory" in capsys.readouterr().err
    assert main(["inspect", "--from", str(tmp_path)]) == 1
    assert "holds no fvcompile dump" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["inspect"], ["inspect", "llama-tiny"], ["inspect", "--rank", "x"],
                                  ["inspect", "llama-tiny", "--from", "d"],
                                  ["inspect", "llama-tiny", "--out", "d", "--rank", "0"]])
def test_inspect_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "usage: fvcompile inspect" in capsys.readouterr().err


def test_write_text_and_any_hook_name(tmp_path):
    dumper = Dumper(tmp_path, "0/0", OptimizeReport())
    dumper.write_hook_graph("joint_post", "joint", torch.fx.symbolic_trace(Mlp()))
    dumper.write_text("forward_scheduler_nodes_at_pre_fusion_hook", "buf0: SchedulerNode(...)\n")
    dumper.write_text("notes.md", "# notes\n")
    assert _index_files(tmp_path) == ["graph_0_0/00_joint_at_joint_post_hook.py",
                                      "graph_0_0/00_joint_at_joint_post_hook.graph.json",  # its nodes, as data
                                      "graph_0_0/01_forward_scheduler_nodes_at_pre_fusion_hook.txt",
                                      "graph_0_0/02_notes.md"]
    assert (tmp_path / "graph_0_0/01_forward_scheduler_nodes_at_pre_fusion_hook.txt").read_text().startswith("buf0")
    for bad in ("../escape.txt", "", ".hidden"):
        with pytest.raises(ValueError, match="not a plain file name"):
            dumper.write_text(bad, "x")
