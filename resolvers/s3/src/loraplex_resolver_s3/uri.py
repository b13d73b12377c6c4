"""`S3UriTemplate`: where an adapter lives in S3, from its name and the served base model."""

from __future__ import annotations

import string
from dataclasses import dataclass

from loraplex.lora.adapter_dir import name_problem

__all__ = ["PLACEHOLDERS", "S3Location", "S3UriTemplate"]

PLACEHOLDERS = ("lora_name", "base_model_name")


@dataclass(frozen=True)
class S3Location:
    """One adapter's folder in S3: `s3://{bucket}/{key}/` (key without a trailing slash)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}/"

    @property
    def path(self) -> str:
        """The folder as s3fs names it (`bucket/key`)."""
        return f"{self.bucket}/{self.key}"


@dataclass(frozen=True)
class S3UriTemplate:
    """A URI template such as `s3://bucket/loras/{base_model_name}/{lora_name}`.

    Placeholders: `{lora_name}` (the requested name; may hold `/` for nested folders) and
    `{base_model_name}` (the served base model's last path component: `SmolLM2-135M-Instruct`
    for both `HuggingFaceTB/SmolLM2-135M-Instruct` and `/models/SmolLM2-135M-Instruct`). A
    template without `{lora_name}` is a prefix: `s3://bucket/loras` means
    `s3://bucket/loras/{lora_name}`. Placeholders go in the key, not in the bucket.
    """

    template: str

    def __post_init__(self) -> None:
        template = self.template.strip()
        if not template.startswith("s3://"):
            raise ValueError(f"S3 LoRA URI {self.template!r} must start with s3://, e.g. s3://my-bucket/loras/{{lora_name}}")
        fields = []
        try:
            for _, field, spec, conversion in string.Formatter().parse(template):
                if field is None:
                    continue
                if field not in PLACEHOLDERS or spec or conversion:
                    raise ValueError(f"unknown placeholder {{{field}}}")
                fields.append(field)
        except ValueError as exc:
            raise ValueError(
                f"S3 LoRA URI {self.template!r} is not a valid template ({exc}); the placeholders are "
                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}, and literal braces are written {{{{ }}}}"
            ) from None
        template = template.rstrip("/")
        if "lora_name" not in fields:
            template += "/{lora_name}"
        bucket = template[len("s3://"):].split("/", 1)[0]
        if not bucket or "{" in bucket or "}" in bucket:
            raise ValueError(f"S3 LoRA URI {self.template!r} must name a bucket (without placeholders): s3://BUCKET/...")
        object.__setattr__(self, "template", template)

    @property
    def uses_base_model(self) -> bool:
        return "{base_model_name}" in self.template

    def render(self, base_model_name: str, lora_name: str) -> S3Location:
        """The adapter's folder; ValueError if a placeholder's value cannot be part of a key."""
        values = {"lora_name": lora_name, "base_model_name": short_name(base_model_name)}
        for field, value in values.items():
            if "{" + field + "}" in self.template and (problem := name_problem(value)) is not None:
                raise ValueError(f"{field} {value!r} cannot be part of an S3 key: {problem}")
        rest = self.template.format(**values)[len("s3://"):]
        bucket, _, key = rest.partition("/")
        return S3Location(bucket, key.strip("/"))


def short_name(model_name: str) -> str:
    """A model's last path component, as given (case kept)."""
    return model_name.rstrip("/").rsplit("/", 1)[-1] if model_name else ""
