"""``bpo doctor``: does each installed engine actually generate on this machine, with each prepared model?"""
