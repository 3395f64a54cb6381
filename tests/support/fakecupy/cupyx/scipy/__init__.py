"""The stand-in's ``cupyx.scipy`` (see ``cupy``)."""
