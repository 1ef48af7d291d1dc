"""luab_sk.nn"""
