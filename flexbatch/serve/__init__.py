"""`flexbatch serve`: an OpenAI-compatible server (completions, chat, Files and Batches APIs)
in front of one loaded model; batches run through the job runner, state lives in a data dir."""
