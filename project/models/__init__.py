from project.models.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
