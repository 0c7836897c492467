"""Outputs: business rules decide which recommendations may reach customers, and why not."""

from assets.outputs.business_rules import output_expectation_suite, validated_recommendations

ASSETS = [validated_recommendations]
CHECKS = [output_expectation_suite]
