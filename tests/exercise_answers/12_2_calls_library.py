# expect: your answer calls fusionlib\.rdrop\.compute_kl_loss: the exercise asks for the KL term written without fusionlib\.rdrop
def symmetric_kl(p_logits, q_logits):
    return rdrop.compute_kl_loss(p_logits, q_logits)                    # the prompt rules this out
