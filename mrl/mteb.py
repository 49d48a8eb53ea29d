"""python -m mrl.mteb: MTEB at every dim × precision, the command of mrl/eval/mteb.py (mteb: an optional extra)."""

from mrl.eval.mteb import main

if __name__ == "__main__":  # guarded: importing every module of mrl (tests/test_no_st_import.py) runs nothing
    main()
