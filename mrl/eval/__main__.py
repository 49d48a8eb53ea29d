"""python -m mrl.eval: see mrl/eval/evaluate.py."""

from mrl.eval.evaluate import main

if __name__ == "__main__":  # guarded: importing every module of mrl (tests/test_no_st_import.py) runs nothing
    main(prog="python -m mrl.eval")
