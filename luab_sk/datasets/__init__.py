"""luab_sk.datasets"""
