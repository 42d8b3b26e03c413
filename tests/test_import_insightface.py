"""Importing insightface ``arcface_torch`` checkpoints (``launch.import_insightface``).

The insightface files are made here from a description of their format, independently of our model
code: the iResNet state dict's names and shapes from the architecture (stage widths 64/128/256/512,
blocks r18 [2,2,2,2] .. r100 [3,13,30,3], a downsample on each stage's first block, ``fc`` 512*7*7 ->
512, a ``features`` BatchNorm1d), and ``checkpoint_gpu_{rank}.pt`` dicts whose
``state_dict_softmax_fc["weight"]`` holds rank r's rows under their shard rule, next to the other
entries their trainer saves (epoch, global step, optimizer and LR-scheduler states).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from launch import checkpoint as ckpt
from launch import import_insightface as imp
from launch.models import iresnet
from partialfc import PartialFC
from tests.test_train_e2e import ENV, losses, run_cmd

STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS = {"r18": (2, 2, 2, 2), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
D = 512
C, W_FC, K = 11, 3, 2  # insightface head: 11 classes on 3 GPUs (4, 4, 3 rows); 2 new classes
HEAD_SEED = 7


# insightface's files, from their format -----------------------------------------------------------
def insightface_shapes(depths, num_features: int = D) -> dict:
    """Names and shapes of arcface_torch's iResNet state dict (3 x 112 x 112 input)."""
    shapes = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip(STAGE_WIDTHS, depths), start=1):
        for j in range(blocks):
            p, cin = f"layer{stage}.{j}", inplanes if j == 0 else planes
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if j == 0:  # stride 2 on every stage's first block
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", 512)
    shapes["fc.weight"] = (num_features, 512 * 7 * 7)
    shapes["fc.bias"] = (num_features,)
    bn("features", num_features)
    return shapes


def insightface_state(depths, seed: int = 0, num_features: int = D) -> dict:
    """A plausible trained-looking state dict with those names and shapes (finite activations)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in insightface_shapes(depths, num_features).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[name] = torch.tensor(1000)
        elif name == "features.weight":
            state[name] = torch.ones(shape)  # frozen at 1.0 in insightface
        elif leaf == "running_var":
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif leaf in ("bias", "running_mean"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif "prelu" in name:
            state[name] = torch.full(shape, 0.25)
        elif len(shape) == 1:  # BatchNorm weights
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # convolutions, fc: variance-preserving
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=g) * (0.5 / fan_in) ** 0.5
    return state


def insightface_bounds(num_classes: int, world: int, rank: int) -> tuple:
    """Their rule: num_local = C // W + (rank < C % W), from C // W * rank + min(rank, C % W)."""
    num_local = num_classes // world + int(rank < num_classes % world)
    start = num_classes // world * rank + min(rank, num_classes % world)
    return start, start + num_local


def write_fc_files(folder: Path, full: torch.Tensor, world: int, sizes=None) -> list:
    """``checkpoint_gpu_{r}.pt`` of every rank holding rows of ``full`` (their rule unless ``sizes``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for rank in range(world):
        end = start + sizes[rank] if sizes else insightface_bounds(full.shape[0], world, rank)[1]
        rows = full[start:end].clone()
        torch.save({"epoch": 3, "global_step": 1234, "state_dict_backbone": {"conv1.weight": torch.zeros(1)},
                    "state_dict_softmax_fc": {"weight": rows},
                    "state_optimizer": {"state": {0: {"momentum_buffer": torch.randn(rows.shape)}},
                                        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]},
                    "state_lr_scheduler": {"base_lrs": [0.1], "last_epoch": 1234}},
                   folder / f"checkpoint_gpu_{rank}.pt")
        paths.append(str(folder / f"checkpoint_gpu_{rank}.pt"))
        start = end
    return paths


def write_config(path: Path, num_classes: int, data: dict | None = None) -> Path:
    """A fine-tuning run config: r18 on 112 x 112 RGB, ``num_classes`` training classes."""
    cfg = {"data": data or {"dataset": "synthetic", "synthetic_classes": num_classes, "synthetic_per_class": 2,
                            "heldout_classes": 5, "augment": False},
           "model": {"backbone": "r18", "embedding_size": D},
           "head": {"margin": "arcface", "s": 16.0, "m2": 0.3, "seed": HEAD_SEED},
           "optim": {"lr": 0.01, "warmup_steps": 0},
           "train": {"steps": 2, "epochs": None, "batch_size": 2, "ckpt_every": 0, "log_every": 1},
           "eval": {"pairs": 10, "batch_size": 8}}
    cfg["data"].update(image_size=112, in_channels=3)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """insightface r18 ``model.pt`` and 3 ``checkpoint_gpu_*.pt`` of an 11-class head, config files."""
    root = tmp_path_factory.mktemp("insightface")
    state = insightface_state(DEPTHS["r18"])
    torch.save(state, root / "model.pt")
    full = torch.randn(C, D, generator=torch.Generator().manual_seed(5)) * 3.0  # trained rows: norms ~68
    fc = write_fc_files(root / "fc", full, W_FC)
    return {"root": root, "backbone": str(root / "model.pt"), "state": state, "fc": fc, "full": full,
            "config": str(write_config(root / "run.yaml", C)),
            "config_added": str(write_config(root / "run_added.yaml", C + K))}


def rows_of(path) -> torch.Tensor:
    """Every head row of a checkpoint, in rank order (as launch.evaluate reads them)."""
    meta = ckpt.read_meta(path)
    return torch.cat([torch.load(Path(path) / f"head_rank{r}.pt", weights_only=True)["weight"]
                      for r in range(meta["world_size"])])


def run_import(files, out, *extra, config=None) -> int:
    return imp.main(["--backbone", files["backbone"], "--arch", "r18", "--num-classes", str(C),
                     "--config", config or files["config"], "--output", str(out), *extra])


# backbone ------------------------------------------------------------------------------------------
def test_r50_state_dict_loads_strictly_and_runs():
    state = insightface_state(DEPTHS["r50"], seed=1)
    with torch.device("meta"):
        ours = iresnet("r50")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == insightface_shapes(DEPTHS["r50"])
    ours.load_state_dict(state, strict=True, assign=True)
    imported = imp.build_backbone(state, "r50").eval()  # built on meta, the state dict assigned strictly
    assert all(p.device.type == "cpu" and p.requires_grad for p in imported.parameters())
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        out = imported(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, D) and torch.isfinite(out).all()


def test_r100_names_and_shapes_on_meta():
    with torch.device("meta"):
        model = iresnet("r100")
        state = {k: torch.empty(s) for k, s in insightface_shapes(DEPTHS["r100"]).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == insightface_shapes(DEPTHS["r100"])
    model.load_state_dict(state, strict=True)
    imp.check_backbone_state(state, model, "r100")


def test_module_prefix_and_checkpoint_gpu_backbone(files, tmp_path):
    """Published backbones saved from the DDP wrapper prefix every key with ``module.``."""
    state = files["state"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pt")
    torch.save({"epoch": 1, "state_dict_backbone": state}, tmp_path / "checkpoint_gpu_0.pt")
    for name in ("prefixed.pt", "checkpoint_gpu_0.pt"):
        read = imp.read_backbone_state(tmp_path / name)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
        imp.build_backbone(read, "r18")


def test_backbone_mismatches_are_listed():
    with torch.device("meta"):
        r100 = iresnet("r100")
        r50_state = {k: torch.empty(s) for k, s in insightface_shapes(DEPTHS["r50"]).items()}
    with pytest.raises(imp.InsightFaceImportError, match=r"missing: layer2\.4\..*it looks like --arch r50"):
        imp.check_backbone_state(r50_state, r100, "r100")
    with torch.device("meta"):
        r18 = iresnet("r18")
        state = {k: torch.empty(s) for k, s in insightface_shapes(DEPTHS["r18"]).items()}
    del state["layer1.0.bn1.running_var"]
    state["layer9.weight"] = torch.empty(3)
    state["fc.bias"] = torch.empty(7)
    with pytest.raises(imp.InsightFaceImportError) as err:
        imp.check_backbone_state(state, r18, "r18")
    msg = str(err.value)
    assert "missing: layer1.0.bn1.running_var" in msg and "unexpected: layer9.weight" in msg
    assert "fc.bias (7,) (expected (512,))" in msg


def test_unknown_arch(files):
    with pytest.raises(imp.InsightFaceImportError, match="unknown --arch 'r200'"):
        imp.build_backbone(files["state"], "r200")
    with pytest.raises(SystemExit):
        imp.main(["--backbone", files["backbone"], "--arch", "r200", "--num-classes", "3", "--config", "x",
                  "--output", "y"])


# head ----------------------------------------------------------------------------------------------
def test_head_is_concatenated_and_reshards_to_any_world(files, tmp_path):
    """Imported from 3 uneven shards; every rank of 1, 2 or 3 reads exactly its slice."""
    out = tmp_path / "imported"
    assert run_import(files, out, "--fc", *files["fc"]) == 0
    meta = ckpt.read_meta(out)
    assert meta["num_classes"] == C and meta["world_size"] == W_FC and meta["step"] == 0
    assert meta["shards"] == [[0, 4], [4, 8], [8, 11]] and not ckpt.verify_checkpoint(out)
    assert torch.equal(rows_of(out), files["full"])
    for world in (1, 2, 3):
        for rank in range(world):
            start, end = insightface_bounds(C, world, rank)
            weight, opt_state, groups = ckpt._reshard_rows(out, meta, start, end, torch.empty(0, D))
            assert torch.equal(weight, files["full"][start:end]) and opt_state == {} and groups is None
    backbone, cfg = ckpt.load_backbone(out)
    assert cfg.model.backbone == "r18" and all(torch.equal(backbone.state_dict()[k], v)
                                               for k, v in files["state"].items())


def test_load_checkpoint_without_optimizer_state(files, tmp_path):
    """``launch.checkpoint.load_checkpoint`` takes the weights; both optimizers keep the run's own
    settings and start without state; one step runs."""
    out = tmp_path / "imported"
    assert run_import(files, out, "--fc", *files["fc"]) == 0
    head, backbone = PartialFC(D, C, seed=HEAD_SEED), iresnet("r18")
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.01, momentum=0.9)
    opt_h = torch.optim.SGD(head.parameters(), lr=0.02, momentum=0.9)
    state = ckpt.load_checkpoint(out, backbone=backbone, head=head, backbone_optimizer=opt_b, head_optimizer=opt_h)
    assert torch.equal(head.weight.detach(), files["full"]) and state["step"] == 0
    assert torch.equal(backbone.fc.weight.detach(), files["state"]["fc.weight"])
    assert opt_b.state_dict()["state"] == {} and opt_h.state_dict()["state"] == {}
    assert opt_h.param_groups[0]["lr"] == 0.02 and state["resharded_from"] == W_FC
    head(backbone(torch.randn(2, 3, 112, 112)), torch.tensor([0, 10])).backward()
    opt_b.step(), opt_h.step()


def test_fc_shard_formats(tmp_path):
    """checkpoint_gpu_{r}.pt, a bare softmax state dict, and PartialFC v1's bare weight tensor (here
    in torch's legacy, non-zip format, which cannot be memory-mapped); anything else is refused."""
    rows = torch.randn(4, D)
    torch.save({"epoch": 1, "state_dict_softmax_fc": {"weight": rows}}, tmp_path / "checkpoint_gpu_0.pt")
    torch.save({"weight": rows}, tmp_path / "softmax_fc_0.pt")
    torch.save(rows, tmp_path / "rank_0_softmax_weight.pt", _use_new_zipfile_serialization=False)
    for name in ("checkpoint_gpu_0.pt", "softmax_fc_0.pt", "rank_0_softmax_weight.pt"):
        assert torch.equal(imp.read_fc_shard(tmp_path / name), rows)
    torch.save({"epoch": 1, "state_optimizer": {}}, tmp_path / "other_0.pt")
    with pytest.raises(imp.InsightFaceImportError, match="no softmax weight .keys: epoch, state_optimizer"):
        imp.read_fc_shard(tmp_path / "other_0.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: never unpickled here
    with pytest.raises(imp.InsightFaceImportError, match="cannot be read as a weights-only torch file"):
        imp.read_backbone_state(tmp_path / "module.pt")


@pytest.mark.parametrize("extra", [1, -2])
def test_shards_that_do_not_add_up(files, tmp_path, capsys, extra):
    """Published shards have been reported not to add up to the class count: say by how much."""
    full = torch.randn(C + extra, D)
    fc = write_fc_files(tmp_path / "fc", full, W_FC)
    assert run_import(files, tmp_path / "out", "--fc", *fc) == 1
    err = capsys.readouterr().err
    assert f"hold {C + extra} rows in all, --num-classes is {C}" in err
    assert f"{abs(extra)} {'more' if extra > 0 else 'fewer'} row(s) than classes (difference {extra:+d})" in err
    assert not (tmp_path / "out").exists()


def test_fc_file_errors(files, tmp_path, capsys):
    fc = files["fc"]
    assert run_import(files, tmp_path / "a", "--fc", fc[1], fc[0], fc[2]) == 1
    err = capsys.readouterr().err
    assert "out of rank order (ranks [1, 0, 2])" in err and f"{fc[0]} {fc[1]} {fc[2]}" in err
    narrow = write_fc_files(tmp_path / "narrow", torch.randn(C, 256), W_FC)
    assert run_import(files, tmp_path / "b", "--fc", *narrow) == 1
    assert "rows of width 256, the backbone's embeddings have 512" in capsys.readouterr().err
    uneven = write_fc_files(tmp_path / "uneven", torch.randn(C, D), W_FC, sizes=[3, 4, 4])
    assert run_import(files, tmp_path / "c", "--fc", *uneven) == 1
    assert "3 rows, but rank 0 of 3 holds 4 of 11 classes" in capsys.readouterr().err


def test_config_and_data_must_fit(files, tmp_path, capsys):
    assert run_import(files, tmp_path / "a", "--fc", *files["fc"], "--model.backbone", "r50") == 1
    assert "model.backbone is 'r50', the imported model needs 'r18'" in capsys.readouterr().err
    assert run_import(files, tmp_path / "b", "--fc", *files["fc"], "--add-classes", "3") == 1
    assert "training set has 11 classes, the head 14" in capsys.readouterr().err


def test_add_classes_id_init(files, tmp_path):
    """New rows are what a fresh head (head.seed) has for those global ids; old rows are kept."""
    out = tmp_path / "imported"
    assert run_import(files, out, "--fc", *files["fc"], "--add-classes", str(K),
                      config=files["config_added"]) == 0
    rows = rows_of(out)
    assert ckpt.read_meta(out)["num_classes"] == C + K and rows.shape == (C + K, D)
    assert torch.equal(rows[:C], files["full"])
    assert torch.equal(rows[C:], PartialFC(D, C + K, seed=HEAD_SEED).weight.detach()[C:])


def _image_folder(root: Path, images_per_class: list) -> dict:
    """``root/<class>/<i>.png`` of random 112 x 112 RGB images; {class id: [paths]}."""
    rng, paths = np.random.default_rng(0), {}
    for label, n in enumerate(images_per_class):
        folder = root / f"id{label:03d}"
        folder.mkdir(parents=True)
        paths[label] = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            paths[label].append(folder / f"{i}.png")
    return paths


def test_add_classes_mean_embedding_init(files, tmp_path):
    """Each new row: the normalised mean of its images' normalised embeddings, at the mean norm of
    the imported rows (computed here from the files, the images read with PIL)."""
    paths = _image_folder(tmp_path / "faces", [1] * C + [3, 2])
    config = write_config(tmp_path / "run.yaml", C + K, data={"dataset": "folder", "root": str(tmp_path / "faces")})
    out = tmp_path / "imported"
    assert run_import(files, out, "--fc", *files["fc"], "--add-classes", str(K), "--init", "mean",
                      config=str(config)) == 0
    with torch.device("meta"):
        backbone = iresnet("r18")
    backbone.load_state_dict(files["state"], assign=True)
    backbone.eval()
    norm = files["full"].norm(dim=1).mean()
    rows = rows_of(out)
    for j in range(K):
        x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
                         for p in paths[C + j]])
        with torch.no_grad():
            emb = torch.nn.functional.normalize(backbone(x), dim=1)
        expected = torch.nn.functional.normalize(emb.mean(0), dim=0) * norm
        torch.testing.assert_close(rows[C + j], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows[:C], files["full"])


def test_mean_init_needs_images_of_every_new_class():
    class Labelled(torch.utils.data.Dataset):
        labels = np.array([0, 0, 1, 3])

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 112, 112), int(self.labels[i])

    with torch.device("meta"):
        backbone = iresnet("r18")
    with pytest.raises(imp.InsightFaceImportError, match=r"no training images for new class\(es\) 2, 4"):
        imp.mean_embedding_rows(backbone, Labelled(), [2, 3, 4], norm=1.0)


# end to end ----------------------------------------------------------------------------------------
def test_fine_tune_evaluate_export(files, tmp_path):
    """The README's commands: import with 2 new classes, fine-tune 2 steps on 2 ranks, evaluate, export."""
    imported = tmp_path / "imported"
    assert run_import(files, imported, "--fc", *files["fc"], "--add-classes", str(K),
                      config=files["config_added"]) == 0
    run = tmp_path / "run"
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "launch.train", "--config", files["config_added"], "--train.output_dir", str(run),
                    "--train.resume", str(imported)], timeout=240, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"resumed from {imported} at step 0 (re-sharded from {W_FC} ranks)" in proc.stderr
    assert sorted(losses(run)) == [1, 2] and all(np.isfinite(v) for v in losses(run).values())
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["num_classes"] == C + K
    from launch import evaluate, export  # in this process: the same main() as `python -m`, no start-up
    assert evaluate.main(["--checkpoint", str(imported), "--train-samples", "4",
                          "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["train_samples"] == 4 and 0.0 <= result["verification_acc"] <= 1.0
    onnx = tmp_path / "backbone.onnx"
    assert export.main(["--checkpoint", str(imported), "--output", str(onnx)]) == 0  # checked in onnxruntime
    assert onnx.stat().st_size > 1_000_000
