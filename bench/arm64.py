"""Proof on the Pi's architecture: the `device` extra on arm64 Debian under emulation.

    python -m bench.arm64 [--root /work/arm64-root] [--keep] [--seconds 30] [--bundle DIR] [--mirror URL]

Needs root and Debian's apt (it installs qemu-user-static, debootstrap and binfmt-support
itself, idempotently). In one run, side by side:
  1. qemu-user-static registered with binfmt_misc for aarch64; `chroot ROOT /bin/true` runs arm64 code;
  2. an arm64 Debian 12 (bookworm, Python 3.11: the Raspberry Pi OS base) debootstrapped into ROOT
     from the apt mirror this machine is configured with (cached: kept between runs);
  3. the working tree (tracked + untracked, not ignored files) copied to ROOT/opt/edgedance,
     a fresh venv and `pip install '.[device]'` under emulation; `import tensorflow` must fail;
  4. `python -m device selftest` inside (or, before it exists, a features run and a bundle
     load + step);
  5. one synthesized song (device.demo.write_song): the integer log-Mel (device.frontend.log_mel)
     and `python -m device features SONG --out F.npy` on arm64 and on x86, compared bit for bit,
     plus poses of the same bundle from those features; both timed (the emulation slowdown).
Writes docs/bench/arm64.md. Slow (tens of minutes on a first run, minutes after): opt-in for
`make bench` (see OPT_IN).

The same file is the probe that runs on each side (`--probe OUTDIR`): copied into the root
and run there as a plain script, so the installed package is what gets imported.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import pathlib
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

import numpy as np

log = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "bench" / "arm64.md"
DEFAULT_ROOT = pathlib.Path("/work/arm64-root")
SUITE = "bookworm"
INCLUDE = "python3,python3-venv,python3-pip,libsndfile1,portaudio19-dev,gcc,python3-dev,ca-certificates,mosquitto"
ROOT_PACKAGES = ("mosquitto",)  # for the selftest's broker round trip (a private broker inside)
PI_CPUS = {"cortex-a72": "Raspberry Pi 4 / 400 / CM4", "cortex-a76": "Raspberry Pi 5", "cortex-a53": "Pi 3 / Zero 2"}
SELFTEST_MUST_PASS = ("frontend", "bundle", "broker")
OPT_IN = True  # bench.run: not part of a default `make bench` (tens of minutes under emulation)

# Paths inside the root.
SRC = "/opt/edgedance"
VENV = "/opt/edgedance-venv"
WORK = "/tmp/edgedance-arm64"
PROBE = f"{WORK}/probe.py"
HOST_CA = "/etc/ssl/certs/edgedance-host-ca.crt"  # the host's CA bundle, copied in while mounted
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "PIP_CERT": HOST_CA,
    "SSL_CERT_FILE": HOST_CA,
}
TIMEOUT_S = {"debootstrap": 3600, "install": 3600, "default": 1200}


class Arm64Error(RuntimeError):
    """A step of the arm64 proof that could not run here: says which step and how to fix it."""


# ---------------------------------------------------------------------------------------
# Host set-up: tools, binfmt, the root file system


def apt_mirror(files: list[pathlib.Path] | None = None, suite: str = SUITE) -> str:
    """The Debian mirror apt on this machine uses for `suite` (not the security archive):
    the first matching entry of /etc/apt/sources.list and sources.list.d/*.list|*.sources."""
    if files is None:
        d = pathlib.Path("/etc/apt/sources.list.d")
        files = [pathlib.Path("/etc/apt/sources.list")]
        files += sorted(p for p in d.glob("*") if p.suffix in (".list", ".sources")) if d.is_dir() else []
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#") and not line.startswith((" ", "\t")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.split()
                if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                        and fields.get("uris") and fields.get("enabled", ["yes"])[0] != "no"):
                    return fields["uris"][0].rstrip("/")
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] != ["deb"]:
                    continue
                words = words[1:]
                if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                    while words and not words[0].endswith("]"):
                        words = words[1:]
                    words = words[1:]
                if len(words) >= 2 and words[1] == suite:
                    return words[0].rstrip("/")
    raise Arm64Error(f"no apt source for Debian {suite!r} in {', '.join(map(str, files))}; "
                     "pass the mirror with --mirror URL")


def _run(cmd: list[str], what: str, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or TIMEOUT_S["default"], **kw)
    except subprocess.TimeoutExpired as e:
        raise Arm64Error(f"{what}: no result after {e.timeout:.0f} s: {' '.join(cmd)}") from e
    except OSError as e:
        raise Arm64Error(f"{what}: cannot start {cmd[0]!r}: {e}") from e
    if p.returncode != 0:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-25:])
        raise Arm64Error(f"{what}: `{' '.join(cmd)}` exited with {p.returncode}:\n{tail}")
    return p


def ensure_tools() -> list[str]:
    """qemu-user-static, debootstrap, binfmt-support from apt if missing; returns what was installed."""
    if os.geteuid() != 0:
        raise Arm64Error("needs root (apt-get, debootstrap, chroot, mount); run it as root")
    need = [pkg for pkg, exe in (("qemu-user-static", "qemu-aarch64-static"), ("debootstrap", "debootstrap"),
                                 ("binfmt-support", "update-binfmts")) if shutil.which(exe) is None]
    if need:
        log.info("apt-get install %s", " ".join(need))
        _run(["apt-get", "install", "-y", *need], "installing the emulation tools", timeout=1800,
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return need


BINFMT = pathlib.Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt() -> dict:
    """binfmt_misc mounted and the aarch64 handler enabled; returns its interpreter and flags."""
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], "mounting binfmt_misc")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or entry.read_text().splitlines()[0] != "enabled":
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "registering qemu-aarch64 with binfmt_misc")
    if not entry.exists():
        raise Arm64Error(f"{entry} missing after `update-binfmts --enable qemu-aarch64`; "
                         "reinstall qemu-user-static (it ships the binfmt entry)")
    info = dict(line.split(" ", 1) for line in entry.read_text().splitlines()[1:] if " " in line)
    return {"interpreter": info.get("interpreter", "?"), "flags": info.get("flags:", info.get("flags", "?")).strip()}


def root_complete(root: pathlib.Path) -> bool:
    """debootstrap removes ROOT/debootstrap when its second stage has finished."""
    return (root / "etc" / "debian_version").is_file() and not (root / "debootstrap").exists()


def ensure_root(root: pathlib.Path, mirror: str) -> float:
    """debootstrap an arm64 bookworm into `root` unless a complete one is there; seconds spent."""
    if root_complete(root):
        return 0.0
    if root.exists() and any(root.iterdir()):
        raise Arm64Error(f"{root} holds an incomplete debootstrap (no etc/debian_version, or "
                         f"{root}/debootstrap still there); check nothing is mounted under it "
                         f"(`grep {root} /proc/mounts`), remove it and run again")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(root), mirror],
         f"debootstrap of arm64 {SUITE} into {root}", timeout=TIMEOUT_S["debootstrap"])
    return time.perf_counter() - t0


def host_ca_bundle() -> str:
    for f in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile,
              "/etc/ssl/certs/ca-certificates.crt"):
        if f and os.path.isfile(f):
            return f
    raise Arm64Error("no CA bundle on this host (SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt); "
                     "install ca-certificates")


@contextlib.contextmanager
def mounted(root: pathlib.Path):
    """/proc and /dev inside the root for the duration (and the host's resolv.conf and CA bundle
    for pip). Not /sys: with the host's /sys there, LiteRT's cpuinfo takes the emulated machine
    for a real one and the process dies with SIGSEGV under qemu 7.2; without it cpuinfo gives up
    and LiteRT runs without XNNPACK;
    unmounted again, innermost first, however the block ends."""
    done = []
    try:
        for target, cmd in ((root / "proc", ["mount", "-t", "proc", "proc"]),
                            (root / "dev", ["mount", "--bind", "/dev"])):
            if os.path.ismount(target):
                continue
            target.mkdir(exist_ok=True)
            _run([*cmd, str(target)], f"mounting {target}")
            done.append(target)
        resolv = root / "etc" / "resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        # pip inside trusts what the host trusts (e.g. a site's TLS-inspecting proxy CA).
        shutil.copyfile(host_ca_bundle(), root / HOST_CA.lstrip("/"))
        yield
    finally:
        for target in reversed(done):
            p = subprocess.run(["umount", str(target)], capture_output=True, text=True)
            if p.returncode != 0:
                log.error("cannot unmount %s: %s; unmount it by hand before removing %s",
                          target, p.stderr.strip(), root)


def in_root(root: pathlib.Path, cmd: list[str], what: str, cwd: str = "/", timeout: float | None = None,
            check: bool = True, cpu: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` inside the arm64 root with a clean environment, emulating `cpu` (a
    `qemu-aarch64 -cpu help` model; default qemu's 'max'); (result, wall seconds)."""
    full = ["chroot", str(root), "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *cmd]
    env = {**CHROOT_ENV, **({"QEMU_CPU": cpu} if cpu else {})}
    t0 = time.perf_counter()
    if check:
        p = _run(full, what, timeout=timeout, env=env)
    else:
        p = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout or TIMEOUT_S["default"])
    return p, time.perf_counter() - t0


def ensure_root_packages(root: pathlib.Path, packages: tuple[str, ...] = ROOT_PACKAGES) -> list[str]:
    """apt-get install inside the root what debootstrap did not (for roots made before the list
    grew); no daemon is started (policy-rc.d). Returns what was installed."""
    missing = [pkg for pkg in packages
               if in_root(root, ["dpkg-query", "-W", "-f=${Status}", pkg], "dpkg-query", check=False)[0].stdout
               != "install ok installed"]
    if missing:
        policy = root / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        try:
            in_root(root, ["apt-get", "update"], "apt-get update in the root", timeout=1800)
            in_root(root, ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                           "--no-install-recommends", *missing], "apt-get install in the root", timeout=3600)
        finally:
            policy.unlink()
    return missing


def working_tree_files(repo: pathlib.Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree (what a commit of it
    would hold), relative paths; deleted tracked files are left out."""
    p = _run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
             f"listing the files of {repo}")
    return sorted({f for f in p.stdout.split("\0") if f and (repo / f).is_file()})


def copy_tree(repo: pathlib.Path, dest: pathlib.Path) -> int:
    if dest.exists():
        shutil.rmtree(dest)
    files = working_tree_files(repo)
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, dest / f)
    return len(files)


# ---------------------------------------------------------------------------------------
# The probe: runs on both sides, as a plain script (imports the installed `device`)


@contextlib.contextmanager
def _builtin_kernels(model):
    """LiteRT without its default delegate (XNNPACK) inside the block: the built-in kernels it
    falls back to where XNNPACK cannot start (as under qemu)."""
    from ai_edge_litert import interpreter as li
    orig = model.make_interpreter

    def make(model_path, num_threads: int = 1):
        interp = li.Interpreter(model_path=str(model_path), num_threads=num_threads,
                                experimental_op_resolver_type=li.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interp.allocate_tensors()
        return interp

    model.make_interpreter = make
    try:
        yield
    finally:
        model.make_interpreter = orig


def probe(out: pathlib.Path, wavs: list[str], bundle: str | None) -> dict:
    """For each song: its int16 PCM at 16 kHz, log-Mel and features (in-process and through the
    CLI), saved under out/<song>/ and timed; poses of `bundle` from the first song's features,
    with LiteRT's default kernels (out/) and its built-in ones without XNNPACK (out/builtin/)."""
    import importlib.metadata as md

    from device import frontend, model
    from device.audio import load_file
    from device.features import extract

    res: dict = {"machine": platform.machine(), "python": platform.python_version()}
    for dist in ("numpy", "ai-edge-litert", "soundfile", "paho-mqtt", "PyAudio", "tensorflow"):
        try:
            res[dist] = md.version(dist)
        except md.PackageNotFoundError:
            res[dist] = None
    res["runtime"] = model.interpreter_class()[1]
    res["songs"] = {}
    first_x = None
    for wav in wavs:
        d = out / pathlib.Path(wav).stem
        d.mkdir(parents=True, exist_ok=True)
        r: dict = {}
        t0 = time.perf_counter()
        pcm = load_file(wav)
        r["load_s"] = time.perf_counter() - t0
        r["seconds_audio"] = len(pcm) / 16000
        np.save(d / "pcm.npy", pcm)
        t0, c0 = time.perf_counter(), time.process_time()
        mel = frontend.log_mel(pcm)
        r["log_mel_s"], r["log_mel_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        np.save(d / "log_mel.npy", mel)
        t0, c0 = time.perf_counter(), time.process_time()
        feats = extract(pcm)
        r["extract_s"], r["extract_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        # The command line, as a user runs it (interpreter start and imports included).
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "device", "features", wav, "--out", str(d / "F.npy")],
                           capture_output=True, text=True, cwd=str(d))
        r["cli_features_s"] = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"python -m device features {wav} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        r["cli_matches_extract"] = bool(np.array_equal(np.load(d / "F.npy"), feats.x))
        res["songs"][d.name] = r
        first_x = feats.x if first_x is None else first_x

    if bundle:
        b = model.load_bundle(bundle)
        with b.stepper(num_threads=1, seed=0) as sm:
            t0, c0 = time.perf_counter(), time.process_time()
            poses, heads = sm.run(first_x)
            res["model_run_s"], res["model_run_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        res["frames"] = int(poses.shape[0])
        res["quantize"] = b.quantize
        np.save(out / "poses.npy", poses)
        np.save(out / "headings.npy", heads)
        with _builtin_kernels(model), b.stepper(num_threads=1, seed=0) as sm:
            poses, heads = sm.run(first_x)
        (out / "builtin").mkdir(exist_ok=True)
        np.save(out / "builtin" / "poses.npy", poses)
        np.save(out / "builtin" / "headings.npy", heads)
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------
# The comparison


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)) if a.shape == b.shape else None


def compare_song(x86: pathlib.Path, arm: pathlib.Path) -> dict:
    """Bit-for-bit comparison of one song's probe outputs (a folder per side)."""
    r: dict = {}
    if (x86 / "pcm.npy").exists() and (arm / "pcm.npy").exists():
        a, b = np.load(x86 / "pcm.npy"), np.load(arm / "pcm.npy")
        r["pcm_identical"] = _same(a, b)
        r["pcm_samples_differing"] = int(np.count_nonzero(a != b)) if a.shape == b.shape else None
        r["pcm_max_abs_diff"] = _max_diff(a, b)
    a, b = np.load(x86 / "log_mel.npy"), np.load(arm / "log_mel.npy")
    r["log_mel_shape"] = list(a.shape)
    r["log_mel_dtype"] = f"{a.dtype} / {b.dtype}"
    r["log_mel_identical"] = _same(a, b)
    r["log_mel_max_abs_diff"] = _max_diff(a, b)
    a, b = np.load(x86 / "F.npy"), np.load(arm / "F.npy")
    r["features_shape"] = list(a.shape)
    r["features_identical"] = _same(a, b)
    r["features_max_abs_diff"] = _max_diff(a, b)
    ja, jb = (json.loads((d / "F.json").read_text()) for d in (x86, arm))
    r["sidecar_identical"] = ja == jb  # beat times, bpm, phase, metre, config hash
    return r


def compare_poses(x86: pathlib.Path, arm: pathlib.Path) -> dict:
    a, b = np.load(x86 / "poses.npy"), np.load(arm / "poses.npy")
    ha, hb = np.load(x86 / "headings.npy"), np.load(arm / "headings.npy")
    return {"poses_identical": _same(a, b), "poses_max_abs_diff": _max_diff(a, b),
            "headings_max_abs_diff": _max_diff(ha, hb)}


# ---------------------------------------------------------------------------------------
# The run


def default_bundle() -> pathlib.Path | None:
    d = REPO / "models" / "default"
    return d if (d / "manifest.json").is_file() else None


def make_bundle(tmp: pathlib.Path) -> pathlib.Path:
    """No shipped bundle yet: a real int8 conversion of a random-weight model of the real
    architecture (converter.bundle.make_test_bundle), made on x86 with TensorFlow."""
    code = ("import sys; from converter.bundle import make_test_bundle; from device.features import n_features; "
            "make_test_bundle(sys.argv[1], n_features(), seed=0)")
    _run([sys.executable, "-c", code, str(tmp / "bundle")], "making a test bundle on x86", cwd=str(REPO))
    return tmp / "bundle"


def _step(steps: list, row: tuple) -> None:
    log.info("%s: %s (%.0f s)", *row)
    steps.append(row)


def run(args) -> tuple[str, bool]:
    root = pathlib.Path(args.root).resolve()
    steps: list[tuple[str, str, float]] = []  # (step, result, seconds)
    t_all = time.perf_counter()

    installed = ensure_tools()
    _step(steps, ("emulation tools (apt)", "installed " + " ".join(installed) if installed else "present", 0.0))
    fmt = ensure_binfmt()
    mirror = args.mirror or apt_mirror()
    secs = ensure_root(root, mirror)
    _step(steps, (f"debootstrap arm64 {SUITE} minbase", f"from {mirror}" if secs else "cached in the root", secs))
    _, secs = in_root(root, ["/bin/true"], "running arm64 /bin/true in the root")
    elf = _run(["file", "-L", str(root / "bin" / "true")], "file(1)").stdout.split(":", 1)[1].split(",")[:2] \
        if shutil.which("file") else ["?"]
    _step(steps, ("`chroot ROOT /bin/true`", f"exit 0 ({','.join(elf).strip()}); binfmt {fmt['interpreter']} "
                  f"flags {fmt['flags']}", secs))

    bundle = pathlib.Path(args.bundle) if args.bundle else default_bundle()
    ok = True
    with tempfile.TemporaryDirectory(prefix="edgedance-arm64-") as tmpd, mounted(root):
        tmp = pathlib.Path(tmpd)
        t0 = time.perf_counter()
        added = ensure_root_packages(root)
        _step(steps, ("root packages " + ", ".join(ROOT_PACKAGES), "installed in the root" if added else "present",
                      time.perf_counter() - t0))
        bundle_note = f"`{bundle}`" if bundle else None
        if bundle is None:
            t0 = time.perf_counter()
            bundle = make_bundle(tmp)
            bundle_note = ("none shipped (`models/default` missing): a random-weight int8 test bundle of the "
                           "real architecture (`converter.bundle.make_test_bundle`), made on x86")
            _step(steps, ("test bundle on x86", "made", time.perf_counter() - t0))

        # 3. source, songs, bundle; venv; install
        t0 = time.perf_counter()
        n = copy_tree(REPO, root / SRC.lstrip("/"))
        work = root / WORK.lstrip("/")
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copy2(__file__, work / "probe.py")
        shutil.copytree(bundle, work / "bundle")
        from device.demo import DEMO_SAMPLE_RATE_HZ, write_song
        songs = [f"song{rate // 1000}k.wav" for rate in (16000, DEMO_SAMPLE_RATE_HZ)]
        for name, rate in zip(songs, (16000, DEMO_SAMPLE_RATE_HZ)):
            write_song(work / name, seconds=args.seconds, sr=rate)
        _step(steps, ("copy working tree + songs + bundle", f"{n} files to ROOT{SRC}", time.perf_counter() - t0))
        venv = root / VENV.lstrip("/")
        if venv.exists():
            shutil.rmtree(venv)
        _, secs = in_root(root, ["python3", "-m", "venv", VENV], "creating the venv")
        _step(steps, ("`python3 -m venv`", VENV, secs))
        p, secs = in_root(root, [f"{VENV}/bin/pip", "install", f"{SRC}[device]"], "pip install '.[device]' on arm64",
                          timeout=TIMEOUT_S["install"])
        (work / "pip.log").write_text(p.stdout + p.stderr)
        built = sorted({line.split("for ", 1)[1].split(" ")[0] for line in p.stdout.splitlines()
                        if line.strip().startswith("Building wheel for ")})
        _step(steps, ("`pip install '.[device]'`", "ok" + (f"; built from source: {', '.join(built)}" if built
                                                            else ""), secs))
        p, _ = in_root(root, [f"{VENV}/bin/pip", "list", "--format=json"], "pip list")
        dists = {d["name"].lower(): d["version"] for d in json.loads(p.stdout)}
        p, secs = in_root(root, [f"{VENV}/bin/python", "-c", "import tensorflow"], "import tensorflow", check=False)
        no_tf = p.returncode != 0 and "No module named 'tensorflow'" in p.stderr and "tensorflow" not in dists
        ok &= no_tf
        _step(steps, ("`import tensorflow` fails", "yes: ModuleNotFoundError; no tensorflow among the "
                      f"{len(dists)} installed distributions" if no_tf
                      else f"NO (exit {p.returncode}): the device extra pulls TensorFlow", secs))

        # 4. the on-device self-test: the file source (no microphone under emulation), a private broker
        st_args = ["--model", f"{WORK}/bundle", "--set", "audio.source=file", "--set", f"audio.file={WORK}/{songs[0]}",
                   *args.selftest_args]
        selftest_cmd = "python -m device selftest " + " ".join(st_args)
        selftest_out = None
        if (REPO / "device" / "selftest.py").is_file():
            p, secs = in_root(root, [f"{VENV}/bin/python", "-m", "device", "selftest", *st_args],
                              "python -m device selftest", cwd=WORK, check=False, cpu=args.cpus[0])
            (work / "selftest.log").write_text(p.stdout + p.stderr)
            selftest_out = p.stdout.strip()  # PASS/FAIL lines; ALSA/JACK probing noise goes to stderr
            status = {line.split()[1].rstrip(":"): line.split()[0] for line in selftest_out.splitlines()
                      if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"]) and len(line.split()) > 1}
            functional = all(status.get(c) == "PASS" for c in SELFTEST_MUST_PASS)
            ok &= functional
            verdict = "PASS (exit 0)" if p.returncode == 0 else (
                f"exit {p.returncode}: " + ", ".join(f"{k} {v}" for k, v in status.items()))
            _step(steps, (f"`{selftest_cmd}` (-cpu {args.cpus[0]})", verdict, secs))
        else:
            _step(steps, ("`python -m device selftest`", "not run: device/selftest.py does not exist yet", 0.0))

        # 5. the same songs on both sides
        x86_out = tmp / "x86"
        _, t_x86 = _run_timed([sys.executable, __file__, "--probe", str(x86_out), "--bundle", str(work / "bundle"),
                               "--wav", *(str(work / s) for s in songs)], "the probe on x86", cwd=str(tmp))
        px86 = json.loads((x86_out / "probe.json").read_text())
        _step(steps, ("probe on x86: PCM, log-Mel, features (in-process + CLI), poses", "ok", t_x86))
        from device.frontend import log_mel
        parm, cmp, poses = {}, {}, {}
        for cpu in args.cpus:
            arm_out = work / f"out-{cpu}"
            p, t_arm = in_root(root, [f"{VENV}/bin/python", PROBE, "--probe", f"{WORK}/out-{cpu}",
                                      "--bundle", f"{WORK}/bundle", "--wav", *(f"{WORK}/{s}" for s in songs)],
                               f"the probe on arm64 ({cpu})", cwd=WORK, cpu=cpu)
            parm[cpu] = json.loads((arm_out / "probe.json").read_text())
            parm[cpu]["xnnpack"] = "XNNPACK delegate" in p.stderr
            _step(steps, (f"probe on arm64, -cpu {cpu}", "ok", t_arm))
            for s in songs:
                stem = s[:-4]
                c = compare_song(x86_out / stem, arm_out / stem)
                # Localise a difference: this host's integer frontend on the arm64 side's PCM.
                c["frontend_on_arm_pcm_identical"] = _same(log_mel(np.load(arm_out / stem / "pcm.npy")),
                                                           np.load(arm_out / stem / "log_mel.npy"))
                cmp[(cpu, stem)] = c
            poses[cpu] = compare_poses(x86_out, arm_out)
            poses[cpu]["builtin"] = compare_poses(x86_out / "builtin", arm_out / "builtin")
            # Poses are reported, not required: the shipped model runs its output stage (gain, low-pass)
            # and the state re-quantization in float, and an autoregressive model feeds any last-ulp
            # difference of a float kernel back into itself. The contract is bit-identical FEATURES.
            first = cmp[(cpu, songs[0][:-4])]
            ok &= all(cmp[(cpu, s[:-4])]["features_identical"] and cmp[(cpu, s[:-4])]["log_mel_identical"]
                      for s in songs)
            ok &= first["pcm_identical"] and first["log_mel_identical"] and first["features_identical"]
            ok &= first["sidecar_identical"] and parm[cpu]["machine"] == "aarch64"
            ok &= all(cmp[(cpu, s[:-4])]["frontend_on_arm_pcm_identical"] for s in songs)
            ok &= all(r["cli_matches_extract"] for r in parm[cpu]["songs"].values())
        ok &= all(r["cli_matches_extract"] for r in px86["songs"].values())
        p, _ = in_root(root, ["cat", "/etc/debian_version"], "debian_version")
        debian = p.stdout.strip()
        p, _ = in_root(root, ["uname", "-m"], "uname -m")
        uname = p.stdout.strip()
        ok &= uname == "aarch64"

        if not args.keep:
            shutil.rmtree(root / SRC.lstrip("/"))
            shutil.rmtree(venv)
            shutil.rmtree(work)

    total = time.perf_counter() - t_all
    md = report(args, steps, px86, parm, cmp, poses, songs, debian, uname, bundle_note, selftest_cmd, selftest_out,
                ok, total)
    return md, ok


def _run_timed(cmd, what, **kw):
    t0 = time.perf_counter()
    p = _run(cmd, what, **kw)
    return p, time.perf_counter() - t0


def _yn(v: bool) -> str:
    return "**yes**" if v else "**NO**"


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def report(args, steps, px86, parm, cmp, poses, songs, debian, uname, bundle_note, selftest_cmd, selftest_out,
           ok, total) -> str:
    cmd = f"python -m bench.arm64 {' '.join(args.argv)}".strip()
    cpus = args.cpus
    lines = [
        "## arm64 (Raspberry Pi OS base) under emulation",
        "",
        f"`{cmd}` on {datetime.date.today().isoformat()}, as root, x86_64 host with qemu-user-static: "
        f"**{'PASS' if ok else 'FAIL'}** in {total / 60:.1f} min. Debian {debian} arm64 minbase root "
        f"`{args.root}`, `uname -m` inside: `{uname}`; emulated CPUs: "
        + ", ".join(f"`{c}`" + (f" ({PI_CPUS[c]})" if c in PI_CPUS else "") for c in cpus)
        + f". Bundle: {bundle_note}.",
        "",
        "| step | result | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s} | {r} | {t:.0f} |" for s, r, t in steps]
    lines += ["", "Versions:", "", "| | x86_64 (host .venv) | " + " | ".join(f"arm64 -cpu {c}" for c in cpus) + " |",
              "| --- | --- | " + " | ".join("---" for _ in cpus) + " |"]
    for k in ("machine", "python", "numpy", "ai-edge-litert", "soundfile", "paho-mqtt", "PyAudio", "tensorflow",
              "runtime", "xnnpack"):
        v86 = "yes (log line)" if k == "xnnpack" else (px86.get(k) or "-")
        lines.append(f"| {k} | {v86} | " + " | ".join(
            ("yes" if parm[c].get(k) else "no") if k == "xnnpack" else str(parm[c].get(k) or "-") for c in cpus) + " |")
    if selftest_out:
        lines += ["", f"`{selftest_cmd}` on arm64 (-cpu {cpus[0]}), its stdout:", "", "```", selftest_out[-3000:], "```",
                  "", f"The bench requires {', '.join(SELFTEST_MUST_PASS)} to PASS; `realtime` is reported, not "
                  "required: under qemu on a shared x86 it measures the emulator and the other jobs, not a Pi."]

    cols = [(c, s[:-4]) for s in songs for c in cpus]
    lines += ["", f"The same files on both sides: `device.demo.write_song(seconds={args.seconds:g}, sr=...)` at "
              "16 kHz (the frontend's rate: no resampling) and at 22.05 kHz (through `device.audio.resample`, "
              "float32). x86 and arm64 outputs compared with `np.array_equal` (dtype and shape included):", "",
              "| check | " + " | ".join(f"`{s}.wav`, {c}" for c, s in cols) + " |",
              "| --- | " + " | ".join("---" for _ in cols) + " |"]
    rows = [
        ("int16 PCM after `device.audio.load_file`", lambda r: f"{_yn(r['pcm_identical'])}"
         + ("" if r["pcm_identical"] else f" ({r['pcm_samples_differing']} samples differ, max "
            f"{_g(r['pcm_max_abs_diff'])} LSB)")),
        ("int16 log-Mel (`device.frontend.log_mel`)", lambda r: f"{_yn(r['log_mel_identical'])} {r['log_mel_shape']}"
         + ("" if r["log_mel_identical"] else f", max diff {_g(r['log_mel_max_abs_diff'])} (Q7.8) = "
            f"{(r['log_mel_max_abs_diff'] or 0) / 256:.2f} dB")),
        ("x86 frontend on the arm64 PCM == arm64 log-Mel", lambda r: _yn(r["frontend_on_arm_pcm_identical"])),
        ("features `python -m device features SONG --out F.npy`", lambda r: f"{_yn(r['features_identical'])} "
         f"{r['features_shape']}, max abs diff {_g(r['features_max_abs_diff'])}"),
        ("F.json (beat times, bpm, phase, metre, config hash)", lambda r: _yn(r["sidecar_identical"])),
    ]
    for name, fn in rows:
        lines.append(f"| {name} | " + " | ".join(fn(cmp[k]) for k in cols) + " |")
    lines.append("| CLI features == in-process `features.extract` (x86 / arm64) | " + " | ".join(
        f"{_yn(px86['songs'][s]['cli_matches_extract'])} / {_yn(parm[c]['songs'][s]['cli_matches_extract'])}"
        for c, s in cols) + " |")
    p0 = parm[cpus[0]]
    lines += ["", f"Poses of the same bundle ({p0.get('quantize')}, LiteRT, 1 thread, {p0.get('frames')} frames) from "
              f"the `{songs[0]}` features (bit-identical inputs), arm64 vs x86:", "",
              "| LiteRT kernels | " + " | ".join(f"arm64 {c} vs x86" for c in cpus) + " |",
              "| --- | " + " | ".join("---" for _ in cpus) + " |"]
    for name, get in (("default (XNNPACK on x86; " + ("XNNPACK" if parm[cpus[0]]["xnnpack"] else
                                                     "built-in: XNNPACK does not start under qemu") + " on arm64)",
                       lambda d: d),
                      ("built-in on both (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`)", lambda d: d["builtin"])):
        lines.append(f"| {name} | " + " | ".join(
            f"identical {_yn(get(poses[c])['poses_identical'])}, max abs pose diff "
            f"{_g(get(poses[c])['poses_max_abs_diff'])}, heading {_g(get(poses[c])['headings_max_abs_diff'])} rad"
            for c in cpus) + " |")

    s0 = songs[0][:-4]
    sec = p0["songs"][s0]["seconds_audio"]
    lines += ["", f"Time for `{songs[0]}` ({sec:.0f} s of audio), wall clock, and the slowdown in CPU time (process "
              "time): the arm64 side is qemu emulating arm64 on this shared x86 host, which says nothing about a "
              "Pi's speed:", "",
              "| stage | x86_64 | " + " | ".join(f"arm64 {c} (slowdown)" for c in cpus) + " |",
              "| --- | --- | " + " | ".join("---" for _ in cpus) + " |"]
    a = px86["songs"][s0]
    for key, name in (("log_mel", "log-Mel, whole song"), ("extract", "features, whole song")):
        lines.append(f"| {name} | {a[key + '_s']:.2f} s | " + " | ".join(
            f"{parm[c]['songs'][s0][key + '_s']:.2f} s ({parm[c]['songs'][s0][key + '_cpu_s'] / max(a[key + '_cpu_s'], 1e-9):.0f}x)"
            for c in cpus) + " |")
    lines.append(f"| `python -m device features` (interpreter start, imports, song; wall) | {a['cli_features_s']:.2f} s | "
                 + " | ".join(f"{parm[c]['songs'][s0]['cli_features_s']:.2f} s "
                              f"({parm[c]['songs'][s0]['cli_features_s'] / a['cli_features_s']:.0f}x)" for c in cpus) + " |")
    if "model_run_s" in px86:
        lines.append(f"| model, {p0['frames']} steps (`StreamingModel.run`) | {px86['model_run_s']:.2f} s | " + " | ".join(
            f"{parm[c]['model_run_s']:.2f} s ({parm[c]['model_run_cpu_s'] / max(px86['model_run_cpu_s'], 1e-9):.0f}x)"
            for c in cpus) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.arm64", description=__doc__.split("\n\n")[0],
                                 epilog="Needs root. The root file system is cached; delete ROOT to start over.")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="the arm64 root file system (outside the repo; "
                    "debootstrapped once, kept)")
    ap.add_argument("--keep", action="store_true", help=f"keep the source copy, venv and outputs in ROOT{SRC}, "
                    f"ROOT{VENV}, ROOT{WORK} after the run (default: removed; the root stays a clean Debian)")
    ap.add_argument("--mirror", help="Debian mirror URL (default: the one apt on this machine uses for bookworm)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the synthesized song (default 30)")
    ap.add_argument("--bundle", help="model bundle for the selftest and the poses (default: models/default; if "
                    "missing, a random-weight test bundle made on x86)")
    ap.add_argument("--selftest-args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments for `python -m device selftest` (the rest of the line)")
    ap.add_argument("--cpus", type=lambda v: [c for c in v.split(",") if c], default=["cortex-a72", "cortex-a76"],
                    help="qemu CPU models to emulate, comma-separated (default cortex-a72,cortex-a76: the Pi 4's and "
                    "the Pi 5's cores); the selftest runs on the first")
    ap.add_argument("--out", default=str(OUT), help="markdown file to write")
    ap.add_argument("--probe", metavar="OUTDIR", help="internal: run the probe on this machine into OUTDIR")
    ap.add_argument("--wav", nargs="+", help="internal: the probe's songs")
    return ap


def _run_cli(argv: list[str] | None) -> tuple[str, bool]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.probe:
        if not args.wav:
            raise SystemExit("--probe needs --wav SONG")
        res = probe(pathlib.Path(args.probe), args.wav, args.bundle)
        return json.dumps(res), True
    md, ok = run(args)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(md, encoding="utf-8")
    return md, ok


def main(argv: list[str] | None = None) -> str:
    return _run_cli(argv)[0]


if __name__ == "__main__":
    # As a plain script (the probe, inside the root), this file's folder must not shadow packages.
    here = str(pathlib.Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        text, good = _run_cli(None)
    except Arm64Error as e:
        print(f"bench.arm64: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    sys.exit(0 if good else 1)
