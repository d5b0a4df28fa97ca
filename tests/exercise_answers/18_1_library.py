# expect: calls fusionlib.deploy.top1_agreement
from fusionlib.deploy import top1_agreement as agreement_of


def agreement(a, b):
    return agreement_of(a, b)
