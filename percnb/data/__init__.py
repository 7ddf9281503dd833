"""Offline-first data: real images (`percnb.data.images`) and real text (`percnb.data.text`)."""
