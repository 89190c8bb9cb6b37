"""zlocal convert: quantizing checkpoints into bitsandbytes and GPTQ formats, and quality reports."""
