"""luab_sk.byproducts"""
