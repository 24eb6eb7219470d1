"""Request and response bodies. Unknown fields are rejected; money is integer cents."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .models import MAX_INTEGER

# What one request may bring in; a balance may grow to MAX_INTEGER by transfers.
MAX_CENTS = 10**15

Cents = Annotated[int, Field(le=MAX_CENTS, description="An amount in cents.")]
# Ids are what the database can hold: a larger one would not fit in a query's parameter.
Id = Annotated[int, Field(ge=1, le=MAX_INTEGER, description="An id.")]


class Input(BaseModel):
    # strict: "100" or true is not money; clients send JSON numbers.
    model_config = ConfigDict(extra="forbid", strict=True)


class AccountIn(Input):
    owner: Annotated[str, Field(min_length=1, max_length=200)]
    balance: Annotated[Cents, Field(ge=0)]


class TransferIn(Input):
    from_account: Id
    to_account: Id
    amount: Annotated[Cents, Field(gt=0)]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None

    @model_validator(mode="after")
    def _distinct_accounts(self) -> TransferIn:
        if self.from_account == self.to_account:
            raise ValueError("from_account and to_account must be different accounts")
        return self


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    owner: str
    balance: int


class TransferOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    from_account: Id
    to_account: Id
    amount: int
    idempotency_key: str | None
