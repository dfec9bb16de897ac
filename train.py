"""zebra's entry point in a checkout (the same as the installed `zebra-train` and `python -m zebra`).

    python train.py                                   # the default pipeline: ilkd -> smart -> kd -> dpo
    python train.py stage=kd mix=uniform mix.n_mla=4  # one stage
    python train.py +experiment=zebra_1b_4mla         # a paper recipe (conf/experiment/)
    python train.py ckpt_path=last                    # resume the stage(s) from their last checkpoints
    python train.py stage=describe                    # model sizes and KV cache of the configured mix
    python train.py --cfg job                         # print the composed config
"""

from zebra.__main__ import main

if __name__ == "__main__":
    main()
