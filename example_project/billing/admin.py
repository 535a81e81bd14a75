from __future__ import annotations

from django.contrib import admin

from .models import Invoice


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = ["number", "order", "amount", "status", "created_at", "voided_at"]
    list_filter = ["status"]
