"""The sandboxed child: runs a learner's code and reports observations, nothing else.

Started by `sandbox.py` as `python -I child.py PRIVATE_DIR`, in an empty working
directory, in its own process group, with memory and CPU limits. It never imports the
reference_engine package. Order matters:

  1. read the job, open the results file, and build the trusted pieces (the observer
     and the timing baseline) while no learner code exists in the process;
  2. install audit hooks (PEP 578: they cannot be removed) that refuse to open the
     protected folders or the results file, to write outside the working directory,
     to import protected modules, and to start processes or load native libraries;
  3. run the learner's cells one by one, each error recorded and the next cell run;
  4. call the function as the job asks, writing results after every stage, so a crash
     or a kill still leaves what was observed before it.

The parent loads the results with torch.load(weights_only=True): only tensors and plain
data can come back, and the parent trusts nothing else from this process.
"""

import linecache
import os
import sys

import torch

PRIVATE = sys.argv[1]
job = torch.load(os.path.join(PRIVATE, "job.pt"), weights_only=True)
# Ranks (chapter 8): copies of this process made now, before any learner code exists, each
# under the same limits and in the same process group (killed whole); rank r > 0 saves
# its own results file. The harness joins them into one gloo group.
RANK, WORLD_SIZE, ranks = 0, int(job.get("world_size", 1)), []
for r in range(1, WORLD_SIZE):
    pid = os.fork()
    if pid == 0:
        RANK, ranks = r, []
        break
    ranks.append(pid)
results_name = "results.pt" if RANK == 0 else f"results-{RANK}.pt"
results_file = open(os.path.join(PRIVATE, results_name), "wb")  # noqa: SIM115 (kept open on purpose)
results = {"cells": [], "found": False, "observed": None}


def save():
    results_file.seek(0)
    results_file.truncate()
    torch.save(results, results_file)
    results_file.flush()


observer = {"__name__": "dojo_observer"}
exec(compile(job["observe_source"], "observe.py", "exec"), observer)
baseline = None
if job.get("baseline_source"):
    namespace = {"__name__": "dojo_baseline"}
    exec(compile(job["baseline_source"], "baseline", "exec"), namespace)
    baseline = namespace[job["baseline_name"]]
harness = None
if job.get("harness_source"):  # trusted set-up that needs the engine (loaded before the walls)
    harness = {"__name__": "dojo_harness", "RANK": RANK, "WORLD_SIZE": WORLD_SIZE,
               "STORE": os.path.join(PRIVATE, "ranks.store")}
    exec(compile(job["harness_source"], "harness", "exec"), harness)
torch.set_num_threads(1)
save()

# -- the walls -----------------------------------------------------------------------------

WORKDIR = os.path.realpath(os.getcwd())
PROTECTED = [os.path.realpath(p) for p in job["protected_paths"]] + [os.path.realpath(PRIVATE)]
BLOCKED_MODULES = tuple(job["blocked_modules"])
REFUSED_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "socket.connect", "socket.bind",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook", "shutil.rmtree",
}


def _inside(path, folder):
    return path == folder or path.startswith(folder + os.sep)


# os.open reports no mode, only its flags: these make it a write
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# events that change the file system, and which of their arguments are paths that change
# (a hard link's source too: writing through the link would change the original)
CHANGING = {"os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.remove": (0,), "os.rmdir": (0,),
            "os.mkdir": (0,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,)}


def _refuse_writing(path) -> None:
    path = os.path.realpath(os.fsdecode(path))
    if not (_inside(path, WORKDIR) or path == os.devnull):
        raise PermissionError(f"graded code may only write inside its working directory, not {path}")


def audit(event, args):
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        if isinstance(path, int) or path is None:
            return
        real = os.path.realpath(os.fsdecode(path))
        if any(_inside(real, p) for p in PROTECTED):
            raise PermissionError(f"graded code may not open {real}")
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = isinstance(flags, int) and bool(flags & WRITE_FLAGS)
        if writing:
            _refuse_writing(path)
    elif event in CHANGING:
        for i in CHANGING[event]:
            if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)):
                _refuse_writing(args[i])
    elif event == "import":
        name = args[0] or ""
        if any(name == b or name.startswith(b + ".") for b in BLOCKED_MODULES):
            raise ImportError(f"graded code may not import {name}")
    elif event in REFUSED_EVENTS:
        raise PermissionError(f"graded code may not use {event}")


sys.addaudithook(audit)

# -- the learner's code ------------------------------------------------------------------------

learner = {"__name__": "__main__"}
for index, source in enumerate(job["cells"]):
    # Each cell's text is registered as the source of its file name, as IPython does:
    # inspect.getsource then finds functions defined in it (Triton's @jit reads its kernel's source).
    linecache.cache[f"<cell {index + 1}>"] = (len(source), None, source.splitlines(True), f"<cell {index + 1}>")
    # saved before the cell runs: a cell that never ends, or ends the process, is named
    status = {"error": None, "finished": False}
    results["cells"].append(status)
    save()
    try:
        exec(compile(source, f"<cell {index + 1}>", "exec"), learner)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the next cell still runs
        status["error"] = observer["describe_error"](e)
    status["finished"] = True
    save()

fn = learner.get(job["function"])
results["found"] = callable(fn)
save()
if callable(fn):
    signature = observer["signature_of"](fn)  # the learner's own, before any wrapping
    if harness is not None:
        fn = harness["wrap"](fn)

    def progress(observed):
        results["observed"] = observed
        save()

    observer["run_job"](fn, job, baseline, progress, signature)
results_file.close()
for pid in ranks:  # rank 0 ends last: the parent reads every file once this process is gone
    os.waitpid(pid, 0)
os._exit(0)  # skip interpreter teardown: learner objects with odd finalizers cannot hang us
