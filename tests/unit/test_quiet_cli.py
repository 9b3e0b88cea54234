"""`saferl sft`, `saferl reward` and `saferl guard train-stream` filter their output as `saferl train` does:
known-harmless library lines dropped, real warnings and errors kept, `-v` shows everything."""

import json
import os
import subprocess
import sys
import textwrap

# One process runs each command in turn, with the plain streams put back before each: the command fails on the
# missing data file after installing its filter (no weights load), then the process logs, tagged with the command,
# what the libraries would while training. Two processes in all (quiet, -v): torch is imported once in each.
SCRIPT = textwrap.dedent("""
    import json, logging, sys, warnings
    from saferl.cli.main import main
    from saferl.quiet import LineFilter
    plain = sys.stdout, sys.stderr
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name, argv in json.loads(sys.argv[1]).items():
        sys.stdout, sys.stderr = plain
        print(f"[{name}] rc", main(argv), flush=True)
        logging.getLogger().handlers[0].setStream(sys.stderr)  # the stream the command left, filtered or not
        logging.getLogger("DeepSpeed").warning(f"[{name}] [real_accelerator.py:213:get_accelerator] Setting "
                                               "accelerator to CPU. If you have GPU or other accelerator, we "
                                               "were unable to detect it.")
        print(f"Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s] [{name}]", file=sys.stderr)
        logging.getLogger("transformers.trainer").warning(f"[{name}] the gradient norm is NaN at step 3")
        warnings.warn(f"[{name}] a real UserWarning from the data")
        sys.stdout.flush(), sys.stderr.flush()
""")

COMMANDS = {
    "sft": ["sft", "--model", "m", "--data", "{missing}", "--out", "{out}"],
    "reward": ["reward", "--model", "m", "--data", "{missing}", "--out", "{out}"],
    "train-stream": ["guard", "train-stream", "--backbone", "m", "--data", "{missing}", "-o", "{out}"],
}


def run(commands):
    env = dict(os.environ, PYTHONWARNINGS="always")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_a_real_warning_reaches_the_user_and_verbose_shows_everything(tmp_path):
    commands = {name: [a.format(missing=tmp_path / f"{name}.jsonl", out=tmp_path / name) for a in argv]
                for name, argv in COMMANDS.items()}
    quiet = run(commands)
    loud = run({name: [*argv, "-v"] for name, argv in commands.items()})
    for name in COMMANDS:
        lines = [line for line in quiet.splitlines() if f"[{name}]" in line or f"{name}.jsonl" in line]
        text = "\n".join(lines)
        assert f"[{name}] rc 2" in text and "saferl: error:" in text, quiet  # the real error
        assert f"[{name}] the gradient norm is NaN" in text and f"[{name}] a real UserWarning" in text, quiet
        assert "Setting accelerator to CPU" not in text and "Writing model shards" not in text, quiet
        assert f"[{name}] [real_accelerator.py" in loud and f"0/1 [00:00<?, ?it/s] [{name}]" in loud, loud
        assert f"[{name}] the gradient norm is NaN" in loud and f"{name}.jsonl" in loud, loud
