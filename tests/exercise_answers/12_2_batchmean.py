# expect: symmetric_kl\(p, q\) is off \(too small\): it is divided by the number of rows.*batchmean
def symmetric_kl(p_logits, q_logits):
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return 0.5 * (F.kl_div(log_q, log_p.exp(), reduction="batchmean")    # KL per row, not summed over rows
                  + F.kl_div(log_p, log_q.exp(), reduction="batchmean"))
