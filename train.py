"""zebra's entry point: compose the Hydra config and run one stage or the whole pipeline.

    python train.py                                   # the default pipeline: ilkd -> smart -> kd -> dpo
    python train.py stage=kd mix=uniform mix.n_mla=4  # one stage
    python train.py +experiment=zebra_1b_4mla         # a paper recipe (conf/experiment/)
    python train.py ckpt_path=last                    # resume the stage(s) from their last checkpoints
    python train.py stage=describe                    # model sizes and KV cache of the configured mix
    python train.py --cfg job                         # print the composed config
"""

import hydra
from omegaconf import DictConfig

from zebra.stages.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from zebra.stages.run import run

    return run(cfg)


if __name__ == "__main__":
    main()
