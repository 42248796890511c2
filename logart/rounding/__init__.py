"""rounding: choose every weight's code given fixed codebook parameters (see DESIGN.md).

    params = cb.fit(W, k=..., s=...)                      # from a search; fixed from here on
    r = rtn(W, cb, params)                                # nearest level
    r = gptq(W, H, cb, params, act_order=False)           # error feedback, any codebook
    r = learned_rounding(W, H, cb, params, source=r.source, config=LLRConfig(reg_weight=1.5))   # LLR
    r.weight   # float32, W's shape, exactly on the codebook;  r.codes: cb.decode(r.codes, params) == r.weight

H is the damped layer Hessian from `logart.calib.hessian.HessianAccumulator.finalize()`.
"""

from logart.rounding.gptq import gptq, inverse_cholesky
from logart.rounding.learned import LLRConfig, QuadraticLoss, learned_rounding
from logart.rounding.rtn import rtn
from logart.rounding.tables import LayerTables, Rounded, hessian_loss

__all__ = ["LLRConfig", "LayerTables", "QuadraticLoss", "Rounded", "gptq", "hessian_loss", "inverse_cholesky",
           "learned_rounding", "rtn"]
