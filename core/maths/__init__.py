"""The paper's maths: noise schedules, the minority score, guidance terms, samplers, quantile classes."""
