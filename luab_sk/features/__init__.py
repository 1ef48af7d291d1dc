"""luab_sk.features"""
