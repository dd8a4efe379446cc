"""Operations over the model: each returns data and prints nothing (render.py does)."""
