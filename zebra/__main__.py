"""zebra's command line: compose the Hydra config and run one stage or the whole pipeline.

    zebra-train                                   # the default pipeline: ilkd -> smart -> kd -> dpo
    zebra-train stage=kd mix=uniform mix.n_mla=4  # one stage
    zebra-train +experiment=zebra_1b_4mla         # a paper recipe (conf/experiment/)
    zebra-train ckpt_path=last                    # resume the stage(s) from their last checkpoints
    zebra-train stage=describe                    # model sizes and KV cache of the configured mix
    zebra-train --cfg job                         # print the composed config

`python train.py ...` in a checkout and `python -m zebra ...` are the same command.

A bad input (zebra.errors.ZebraInputError: a config value, a path, a data file, a teacher spec) prints one line,
`error: <what> (<how to fix>)`, on stderr and exits with status 2; `debug=true` or HYDRA_FULL_ERROR=1 add its
traceback. Any other exception is a bug and keeps Hydra's report (a traceback, status 1).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from zebra.errors import ZebraInputError, one_line
from zebra.launch.resolvers import register_resolvers
from zebra.utils.paths import config_dir

register_resolvers()

INPUT_ERROR_STATUS = 2  # what argparse and most Unix tools exit with for a usage error


class JobInputError(CompactHydraException):
    """A multirun job's input error, handed to Hydra's sweeper (which reports a failed job after its batch; other
    jobs of the batch still run). Hydra prints a compact exception as its message alone, no traceback; `main`
    turns the sweep's exit status into INPUT_ERROR_STATUS."""


def _show_traceback(cfg: DictConfig) -> bool:
    return bool(cfg.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_guarded(cfg: DictConfig):
    """The task: run the stage; an input error becomes its one line on stderr. In a single run the process then
    exits with INPUT_ERROR_STATUS from here: SystemExit passes Hydra's job runner, which catches Exception and
    would print "Error executing job" with a traceback. In a multirun the job fails as a JobInputError instead,
    so the sweep's other jobs still run."""
    from zebra.stages.run import run

    try:
        return run(cfg)
    except ZebraInputError as err:
        if _show_traceback(cfg):
            traceback.print_exc()
        line = f"error: {one_line(err)}"
        if _is_multirun():
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            line = f"error: job #{hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'}): {one_line(err)}"
            print(line, file=sys.stderr, flush=True)
            raise JobInputError(line) from err
        print(line, file=sys.stderr, flush=True)
        sys.exit(INPUT_ERROR_STATUS)


# An absolute path: the installed package `zebra.conf`, or conf/ of a checkout that was never installed.
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_main(cfg: DictConfig):
    return run_guarded(cfg)


_GROUP_CHOICE = re.compile(r"^\+{0,2}(?P<group>[a-z_][a-z0-9_/]*)=(?P<value>[^=]*)$")


def unknown_group_choice(argv: list[str], conf: Path) -> str | None:
    """The first `group=value` override of the command line that names no option of one of zebra's config groups
    (conf/<group>/<value>.yaml), as an error line's text; None when every choice exists. Hydra would report it
    as a failed config load (status 1) after its own start; a sweep's comma list is checked choice by choice,
    and values Hydra computes (`range(...)`, `${...}`) are left to it."""
    for arg in argv:
        m = _GROUP_CHOICE.match(arg)
        if (not m or m["group"].startswith("hydra") or not (conf / m["group"]).is_dir()  # hydra/*: plugins add options
                or any(c in m["value"] for c in "()${}[]*")):
            continue
        group = conf / m["group"]
        for value in (v.strip() for v in m["value"].split(",")):
            if value and value != "null" and not (group / f"{value}.yaml").is_file():
                choices = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
                return f"{m['group']}={value} is not an option of the config group {m['group']} (choices: {choices})"
    return None


def main() -> None:
    """The console script: Hydra's main, with a multirun whose jobs failed on bad input exiting with
    INPUT_ERROR_STATUS (Hydra itself exits with 1 for any failed job)."""
    bad = unknown_group_choice(sys.argv[1:], Path(config_dir()))
    if bad:
        print(f"error: {bad}", file=sys.stderr, flush=True)
        sys.exit(INPUT_ERROR_STATUS)
    try:
        hydra_main()
    except SystemExit as stop:
        # Hydra exits from inside its handler of the job's exception, so that exception is the exit's context
        if stop.code == 1 and isinstance(stop.__context__, JobInputError):
            sys.exit(INPUT_ERROR_STATUS)
        raise


if __name__ == "__main__":
    main()
