"""zebra's command line: compose the Hydra config and run one stage or the whole pipeline.

    zebra-train                                   # the default pipeline: ilkd -> smart -> kd -> dpo
    zebra-train stage=kd mix=uniform mix.n_mla=4  # one stage
    zebra-train +experiment=zebra_1b_4mla         # a paper recipe (conf/experiment/)
    zebra-train ckpt_path=last                    # resume the stage(s) from their last checkpoints
    zebra-train stage=describe                    # model sizes and KV cache of the configured mix
    zebra-train --cfg job                         # print the composed config

`python train.py ...` in a checkout and `python -m zebra ...` are the same command.
"""

import hydra
from omegaconf import DictConfig

from zebra.launch.resolvers import register_resolvers
from zebra.utils.paths import config_dir

register_resolvers()


# An absolute path: the installed package `zebra.conf`, or conf/ of a checkout that was never installed.
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig):
    from zebra.stages.run import run

    return run(cfg)


if __name__ == "__main__":
    main()
