"""Tool calling: how tools reach the prompt, the grammar that forces a call, and how calls
are read back out of the generated text (one format per model family)."""
