# expect: one-directional
def symmetric_kl(p_logits, q_logits):
    return F.kl_div(F.log_softmax(p_logits, -1), F.softmax(q_logits, -1), reduction="sum")   # KL(Q||P) only
