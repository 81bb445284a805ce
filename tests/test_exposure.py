"""The rules for a UI others can reach (docs/SECURITY.md), each bad input a test: exposure needs a password,
server paths stay under the operator's roots (symlinks followed), uploads are bounded and never overwrite, a .zip
that lies about its sizes is refused, and the preview keeps at most ``max_models`` models loaded."""
from __future__ import annotations

import gc
import io
import struct
import weakref
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.launcher import build_parser, parse_auth, read_auth_file, resolve_auth
from app.service import Limits, Sandbox, Service, TrainerError
from tests.service_helpers import make_dataset


def png_bytes(size: int = 8, noise: bool = False) -> bytes:
    buf = io.BytesIO()
    img = Image.effect_noise((size, size), 64).convert("RGB") if noise else Image.new("RGB", (size, size))
    img.save(buf, "PNG")
    return buf.getvalue()


def dataset_files(service: Service, run: str) -> dict[str, bytes]:
    d = service.dataset_dir(run)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


def bounded(tmp_path: Path, **limits) -> Service:
    outputs = tmp_path / "outputs"
    return Service(outputs, presets_dir=tmp_path / "presets", limits=Limits(**limits),
                   sandbox=Sandbox.build(outputs, data_roots=[tmp_path / "allowed"], model_roots=[tmp_path / "models"]))


# --- exposure needs a password -----------------------------------------------------------------
def test_listen_or_share_without_auth_refuses_to_start(capsys):
    for flags in (["--listen"], ["--share"], ["--listen", "--share"]):
        with pytest.raises(SystemExit) as err:
            resolve_auth(build_parser().parse_args(flags))
        text = str(err.value)
        assert all(f in text for f in flags) and "--auth USER:PASS" in text and "--auth-file" in text
        assert "--insecure" in text
    assert resolve_auth(build_parser().parse_args(["--listen", "--insecure"])) is None
    assert resolve_auth(build_parser().parse_args(["--listen", "--auth", "a:b"])) == [("a", "b")]
    assert resolve_auth(build_parser().parse_args([])) is None          # loopback: no password needed
    from app.launcher import main
    with pytest.raises(SystemExit, match="--listen makes this UI reachable"):
        main(["--listen", "--port", "1"])                               # refused before anything starts


def test_auth_without_a_colon_is_a_clear_error():
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(SystemExit, match=r"--auth '.*' is not USER:PASS.*--auth alice:s3cret"):
            parse_auth(bad)
    assert parse_auth("me:pw:x") == ("me", "pw:x")


def test_auth_file_lines(tmp_path):
    good = tmp_path / "logins"
    good.write_text("# team\nalice:one\n\n bob :two:three\n", encoding="utf-8")
    assert read_auth_file(str(good)) == [("alice", "one"), ("bob", "two:three")]
    args = build_parser().parse_args(["--share", "--auth", "c:d", "--auth-file", str(good)])
    assert resolve_auth(args) == [("c", "d"), ("alice", "one"), ("bob", "two:three")]
    bad = tmp_path / "bad"
    bad.write_text("alice:one\njust-a-name\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="line 2 is not USER:PASS"):
        read_auth_file(str(bad))
    (tmp_path / "empty").write_text("# nobody\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="holds no USER:PASS"):
        read_auth_file(str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="cannot be read"):
        read_auth_file(str(tmp_path / "missing"))


# --- server paths ------------------------------------------------------------------------------
def test_default_roots_are_home_and_outputs_on_loopback_and_outputs_alone_when_exposed(tmp_path):
    out = tmp_path / "outputs"
    loop, exposed = Sandbox.build(out), Sandbox.build(out, listen=True)
    assert loop.data_roots == loop.model_roots == (Path.home().resolve(), out.resolve())
    assert exposed.data_roots == exposed.model_roots == (out.resolve(),)
    given = Sandbox.build(out, listen=True, data_roots=[tmp_path / "a", tmp_path / "b"], model_roots=[tmp_path])
    assert given.data_roots == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    assert given.model_roots == (tmp_path.resolve(),)


def test_import_root_outside_the_allowed_roots_is_refused(tmp_path):
    svc = bounded(tmp_path)
    inside = make_dataset(tmp_path / "allowed" / "set", n=2, size=16)
    outside = make_dataset(tmp_path / "elsewhere", n=2, size=16)
    with pytest.raises(TrainerError) as err:
        svc.import_folder("r", str(outside))
    text = str(err.value)
    assert f"'{outside}' is outside the folders" in text and str((tmp_path / "allowed").resolve()) in text
    assert "--data-root" in text and err.value.field == "folder"
    with pytest.raises(TrainerError, match="is outside the folders"):             # a way out through '..'
        svc.import_folder("r", str(tmp_path / "allowed" / ".." / "elsewhere"))
    assert dataset_files(svc, "r") == {}
    assert "Added 2 image(s)" in svc.import_folder("r", str(inside))


def test_a_symlink_out_of_the_imported_folder_is_refused(tmp_path):
    svc = bounded(tmp_path)
    svc.add_files("r", [make_dataset(tmp_path / "allowed" / "first", n=1, size=16) / "img_00.png"])
    before = dataset_files(svc, "r")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(png_bytes())
    src = make_dataset(tmp_path / "allowed" / "set", n=2, size=16)
    (src / "zz.png").symlink_to(secret / "private.png")
    with pytest.raises(TrainerError) as err:
        svc.import_folder("r", str(src))
    assert f"'{src / 'zz.png'}' is a link to {secret / 'private.png'}" in str(err.value)
    assert "outside the folder being imported" in str(err.value)
    assert dataset_files(svc, "r") == before                       # nothing added, nothing lost
    (tmp_path / "allowed" / "link").symlink_to(secret)             # the folder itself a link out of the root
    with pytest.raises(TrainerError, match="resolves to"):
        svc.import_folder("r", str(tmp_path / "allowed" / "link"))


def test_base_models_must_be_under_a_model_root_and_hub_ids_need_allow_downloads(tmp_path):
    svc = bounded(tmp_path)
    form = svc.default_form()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.safetensors").write_bytes(b"x")
    (tmp_path / "other.safetensors").write_bytes(b"x")
    assert "model" not in svc.validate_form({**form, "model": str(tmp_path / "models" / "m.safetensors")})
    errors = svc.validate_form({**form, "model": str(tmp_path / "other.safetensors")})
    assert "outside the folders" in errors["model"] and "--model-root" in errors["model"]
    errors = svc.validate_form({**form, "model": "some-org/some-model"})
    assert "--allow-downloads" in errors["model"] and "some-org/some-model" in errors["model"]
    with pytest.raises(TrainerError, match="--model-root"):            # the preview loads nothing from there
        svc.render(str(tmp_path / "other.safetensors"), {}, prompt="p")
    assert svc.model_loads == 0
    opened = Sandbox.build(tmp_path / "outputs", model_roots=[tmp_path / "models"], allow_downloads=True)
    assert opened.model("some-org/some-model") == "some-org/some-model"


def test_adapters_are_opened_only_under_the_outputs_folder(tmp_path):
    svc = bounded(tmp_path)
    (tmp_path / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(TrainerError, match="outside the outputs folder"):
        svc.inspect(str(tmp_path / "stray.safetensors"))
    with pytest.raises(TrainerError, match="outside the outputs folder"):
        svc.export(str(tmp_path / "stray.safetensors"))


def test_run_names_and_preset_names_with_path_parts_are_refused(tmp_path):
    svc = bounded(tmp_path)
    for bad in ("../up", "../../etc", "a/b", "..", "/abs"):
        with pytest.raises(TrainerError, match="Run name .* is not usable"):
            svc.add_files(bad, [])
    assert not (tmp_path / "up").exists()
    (tmp_path / "outside.json").write_text('{"rank": 4}', encoding="utf-8")
    for bad in ("../outside", str(tmp_path / "outside.json"), "a/b", "..\\x", "quick.toml"):
        with pytest.raises(TrainerError, match="Preset name .* is not usable"):
            svc.preset_form(bad)
        with pytest.raises(TrainerError, match="Preset name .* is not usable"):
            svc.save_preset(svc.default_form(), bad)
    assert svc.preset_form("quick")["max_train_steps"] == 300
    path = svc.save_preset(svc.default_form(), "mine")
    assert path == tmp_path / "presets" / "mine.json" and "mine" in svc.presets()


def test_user_presets_never_go_into_the_package(tmp_path):
    from trainer.config import PRESETS_DIR

    before = sorted(p.name for p in PRESETS_DIR.iterdir())
    svc = Service(tmp_path / "outputs")                          # no --presets-dir: <outputs>/presets
    path = svc.save_preset(svc.default_form(), "mine")
    assert path == svc.outputs / "presets" / "mine.json"
    assert sorted(p.name for p in PRESETS_DIR.iterdir()) == before


# --- uploads -----------------------------------------------------------------------------------
def test_upload_over_the_size_limit_is_refused_and_nothing_is_lost(tmp_path):
    svc = bounded(tmp_path, max_upload_mb=0.01)
    src = tmp_path / "up"
    src.mkdir()
    (src / "small.png").write_bytes(png_bytes())
    svc.add_files("r", [src / "small.png"])
    before = dataset_files(svc, "r")
    (src / "big.png").write_bytes(png_bytes(96, noise=True))
    (src / "other.png").write_bytes(png_bytes())
    with pytest.raises(TrainerError) as err:
        svc.add_files("r", [src / "other.png", src / "big.png"])
    text = str(err.value)
    assert "'big.png' is" in text and "over this server's limit of 0.01 MB" in text and "--max-upload-mb" in text
    assert dataset_files(svc, "r") == before                       # not even other.png was written
    with pytest.raises(TrainerError, match="'big.safetensors' is 0.0[0-9]+ MB, over this server's limit"):
        svc.import_adapter(str((src / "big.png").rename(src / "big.safetensors")))


def test_more_images_than_allowed_are_refused(tmp_path):
    svc = bounded(tmp_path, max_images=3)
    src = make_dataset(tmp_path / "src", n=4, size=16)
    svc.add_files("r", [src / "img_00.png", src / "img_01.png"])
    before = dataset_files(svc, "r")
    with pytest.raises(TrainerError) as err:
        svc.add_files("r", [src / "img_02.png", src / "img_03.png"])
    assert "2 image(s) and the dataset 2" in str(err.value) and "limit of 3 images" in str(err.value)
    assert "--max-images" in str(err.value)
    assert dataset_files(svc, "r") == before
    zipped = tmp_path / "two.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("a.png", png_bytes())
        zf.writestr("b.png", png_bytes())
    with pytest.raises(TrainerError, match="limit of 3 images"):        # zip members count too
        svc.add_files("r", [zipped])
    assert "Added 1 image(s)" in svc.add_files("r", [src / "img_02.png"])


def test_same_name_uploads_get_a_suffix_and_never_overwrite(tmp_path):
    svc = bounded(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "a.png").write_bytes(png_bytes(8))
    (first / "a.txt").write_text("the first a", encoding="utf-8")
    svc.add_files("r", sorted(first.iterdir()))
    (second / "a.png").write_bytes(png_bytes(12))
    (second / "a.txt").write_text("the second a", encoding="utf-8")
    note = svc.add_files("r", sorted(second.iterdir()))
    assert "1 image(s) renamed with a -N suffix" in note
    items = {name: caption for name, _, caption in svc.dataset_items("r")}
    assert items == {"a.png": "the first a", "a-1.png": "the second a"}
    assert (svc.dataset_dir("r") / "a.png").read_bytes() == (first / "a.png").read_bytes()
    zipped = tmp_path / "again.zip"
    with zipfile.ZipFile(zipped, "w") as zf:       # the same name twice in one archive, and once more
        zf.writestr("x/a.png", png_bytes(16))
        zf.writestr("y/a.png", png_bytes(20))
    svc.add_files("r", [zipped])
    assert [n for n, _, _ in svc.dataset_items("r")] == ["a-1.png", "a-2.png", "a-3.png", "a.png"]
    (second / "a.txt").write_text("a caption alone", encoding="utf-8")
    note = svc.add_files("r", [second / "a.txt"])                 # a caption alone: the existing one is kept
    assert "kept the existing caption(s) a.txt" in note
    assert (svc.dataset_dir("r") / "a.txt").read_text(encoding="utf-8") == "the first a"


def zip_that_lies(real: bytes, declared: int, members: int = 1) -> bytes:
    """A .zip whose members (bomb.png, bomb-1.png...) each declare ``declared`` bytes (local header and central
    directory) but hold ``real``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            zf.writestr(f"bomb{f'-{i}' if i else ''}.png", real)
    data = bytearray(buf.getvalue())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            struct.pack_into("<I", data, at + offset, declared)
            at = data.find(signature, at + 4)
    return bytes(data)


def test_a_zip_bomb_is_refused(tmp_path):
    svc = bounded(tmp_path, max_upload_mb=1)
    svc.add_files("r", [make_dataset(tmp_path / "allowed", n=1, size=16) / "img_00.png"])
    before = dataset_files(svc, "r")
    lying = tmp_path / "lying.zip"                # declares 1 kB, unpacks to 4 MB of zeros (4 kB compressed)
    lying.write_bytes(zip_that_lies(b"\0" * (4 << 20), 1000))
    with pytest.raises(TrainerError) as err:
        svc.add_files("r", [lying])
    assert "member 'bomb.png' declares 1000 bytes but does not unpack to them" in str(err.value)
    assert "zip bomb" in str(err.value)
    assert dataset_files(svc, "r") == before      # the partial member was removed
    honest = tmp_path / "honest.zip"              # declares its 4 MB: over the 1 MB per-file limit
    with zipfile.ZipFile(honest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (4 << 20))
    assert honest.stat().st_size < 100_000
    with pytest.raises(TrainerError, match="'honest.zip: big.png' is 4 MB, over this server's limit of 1 MB"):
        svc.add_files("r", [honest])
    huge = tmp_path / "huge.zip"                  # declares 6 GB in all: over what one archive may unpack to
    huge.write_bytes(zip_that_lies(b"x", 3 << 30, members=2))
    wide = bounded(tmp_path / "wide", max_upload_mb=1 << 13)
    with pytest.raises(TrainerError, match="'huge.zip' declares 6.0 GB of contents"):
        wide.add_files("r", [huge])
    short = tmp_path / "short.zip"                # declares more than it holds: damaged, refused too
    short.write_bytes(zip_that_lies(b"x" * 10, 5000))
    with pytest.raises(TrainerError, match="declares 5000 bytes but does not unpack to them"):
        wide.add_files("r", [short])
    assert dataset_files(svc, "r") == before and dataset_files(wide, "r") == {}


def test_an_adapter_upload_that_is_not_safetensors_is_refused(tmp_path):
    svc = bounded(tmp_path)
    for name, data in (("model.ckpt", b"PK\x03\x04"), ("lora.bin", b"\0" * 10), ("fake.safetensors", b"garbage")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TrainerError) as err:
            svc.import_adapter(str(tmp_path / name))
        assert f"'{name}'" in str(err.value) and err.value.field in ("adapter", "lora")
    assert "cannot be read as safetensors" in str(err.value)
    assert not list((svc.outputs / "_imported").glob("*"))          # nothing kept from a failed upload


# --- memory ------------------------------------------------------------------------------------
class Heavy:
    """A stand-in renderer: ``freed`` tells whether the cache let go of it."""

    def __init__(self, model: str):
        self.model = model

    def render(self, settings, loras):
        return Image.new("RGB", (4, 4))


def test_the_renderer_cache_keeps_the_two_most_recent_models_and_frees_the_rest(tmp_path):
    made: list[weakref.ref] = []

    def factory(model: str):
        r = Heavy(model)
        made.append(weakref.ref(r))
        return r

    svc = Service(tmp_path / "outputs", renderer_factory=factory,
                  sandbox=Sandbox.build(tmp_path / "outputs", model_roots=[tmp_path]))
    assert svc.max_models == 2
    models = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        models.append(str(tmp_path / name))
    svc.render(models[0], {}, prompt="p")
    svc.render(models[1], {}, prompt="p")
    svc.render(models[0], {}, prompt="p")              # a is now the most recent: b goes first
    svc.render(models[2], {}, prompt="p")
    assert svc.loaded_models() == [models[0], models[2]] and svc.model_loads == 3
    gc.collect()
    assert [r() is None for r in made] == [False, True, False]     # b's renderer is gone from memory
    svc.render(models[1], {}, prompt="p")
    assert svc.loaded_models() == [models[2], models[1]] and svc.model_loads == 4


def test_snapshots_share_the_history_instead_of_copying_it():
    from types import SimpleNamespace

    from app.jobs import EventFold

    fold = EventFold()

    def step(n: int):
        fold.add("Progress", SimpleNamespace(step=n, total_steps=9, epoch=0, loss=1.0 / n, avg_loss=1.0, lr=1e-4,
                                             it_per_s=1.0, eta_s=1.0))

    for n in range(1, 6):
        step(n)
    early = fold.snapshot(1, "running", "r")
    for n in range(6, 9):
        step(n)
    later = fold.snapshot(2, "running", "r")
    assert early.history._items is later.history._items is fold.history       # one list, no copy per snapshot
    assert [h[0] for h in early.history] == [1, 2, 3, 4, 5] and len(later.history) == 8
    assert early.history[-1][0] == 5 and later.history[2:4] == ((3, 1 / 3, 1.0), (4, 0.25, 1.0))
    assert early.history == tuple(later.history[:5]) and early.history != later.history
    step(3)                                            # a resume from step 2: a new list, old snapshots unchanged
    resumed = fold.snapshot(3, "running", "r")
    assert [h[0] for h in resumed.history] == [1, 2, 3] and len(later.history) == 8


def test_an_encrypted_zip_member_is_a_message_not_a_crash(tmp_path):
    svc = bounded(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", png_bytes())
    data = bytearray(buf.getvalue())
    struct.pack_into("<H", data, 6, 1)                              # the "encrypted" flag, both headers
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 8, 1)
    (tmp_path / "locked.zip").write_bytes(bytes(data))
    with pytest.raises(TrainerError, match="'locked.zip': member 'a.png' .* encrypted"):
        svc.add_files("r", [tmp_path / "locked.zip"])
    assert dataset_files(svc, "r") == {}
