"""luab_sk.estimators"""
