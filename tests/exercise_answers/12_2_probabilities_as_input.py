# expect: symmetric_kl\(p, q\) is off.*Both directions
def symmetric_kl(p_logits, q_logits):
    p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)             # kl_div's input must be log-probabilities
    return 0.5 * (F.kl_div(p, q, reduction="sum") + F.kl_div(q, p, reduction="sum"))
