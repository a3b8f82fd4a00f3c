"""The dcml application: the `dcml` command, local runs, studies, comparisons."""
